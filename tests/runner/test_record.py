"""job.json: JSON round trip, pure changes, compare-and-swap updates on real stores."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from pathlib import Path

import pytest

from colabjob.errors import (
    AlreadyExistsError,
    InvalidTransitionError,
    JobStateError,
    ObjectNotFoundError,
    PreconditionFailedError,
)
from colabjob.jobs.policy import StopReason
from colabjob.runner.record import (
    RECORD_KEY,
    JobRecord,
    Segment,
    config_hash,
    create_record,
    effective_state,
    load_record,
    read_record,
    update_record,
)
from colabjob.runner.states import JobEvent, JobState, LeaseStatus
from colabjob.storage import Store, open_store
from colabjob.storage.retry import RetryPolicy
from tests.fakes import FakeClock


@pytest.fixture(params=["memory", "local", "gcs", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if request.param == "local":
        return str(tmp_path / "job")
    return str(request.getfixturevalue(f"{request.param}_bucket"))


@pytest.fixture
def store(store_url: str, fast_retry: RetryPolicy) -> Store:
    return open_store(store_url, retry=fast_retry)


def seg(n: int = 1, **kw: object) -> Segment:
    base: dict = dict(session_id=f"s{n}", platform="local", host="h", started_at=100.0 * n)
    return Segment(**{**base, **kw})


def test_json_round_trip() -> None:
    rec = JobRecord(
        job_id="j1",
        state=JobState.SUSPENDED,
        config={"lr": 1e-3, "model": {"name": "tiny"}},
        epoch=3,
        history=(seg(1, last_step=10, ended_at=150.0, stop_reason=StopReason.BUDGET), seg(2)),
        created_at=1.0,
        updated_at=2.0,
        extras={"wandb_id": "abc"},
    )
    back = JobRecord.from_json(rec.to_json())
    assert back == rec
    assert back.history[0].stop_reason is StopReason.BUDGET
    assert back.config_hash == config_hash({"model": {"name": "tiny"}, "lr": 1e-3})
    assert back.current_segment == seg(2) and back.last_step == 10


def test_bad_json_is_a_clear_error() -> None:
    with pytest.raises(JobStateError, match="not a valid job record"):
        JobRecord.from_json(b"{not json")
    with pytest.raises(JobStateError, match="schema 99"):
        JobRecord.from_json(b'{"schema": 99, "job_id": "x", "state": "created"}')


def test_segments_begin_and_end() -> None:
    rec = JobRecord(job_id="j").apply(JobEvent.START).begin_segment(seg(1, epoch=2))
    assert rec.state is JobState.RUNNING and rec.epoch == 2
    rec = rec.end_segment(ended_at=500.0, last_step=42, stop_reason=StopReason.SIGNAL)
    rec = rec.apply(JobEvent.SUSPEND)
    assert rec.current_segment is None and rec.last_step == 42
    with pytest.raises(JobStateError, match="no open segment"):
        rec.end_segment(ended_at=1.0, last_step=1, stop_reason=StopReason.BUDGET)
    # a segment left open (the VM vanished) is closed as a crash when the next one begins
    lost = rec.apply(JobEvent.RESUME).begin_segment(seg(2))
    again = lost.apply(JobEvent.EXPIRE).apply(JobEvent.RESUME).begin_segment(seg(3))
    assert again.history[1].stop_reason is StopReason.CRASH
    assert "runner lost" in (again.history[1].error or "")
    assert again.current_segment == seg(3)
    with pytest.raises(InvalidTransitionError):
        JobRecord(job_id="j", state=JobState.COMPLETED).apply(JobEvent.RESUME)


@pytest.mark.parametrize(
    ("state", "lease", "expected"),
    [
        (JobState.RUNNING, LeaseStatus.LIVE, JobState.RUNNING),
        (JobState.RUNNING, LeaseStatus.STALE, JobState.RUNNING),
        (JobState.RUNNING, LeaseStatus.EXPIRED, JobState.SUSPENDED),
        (JobState.RUNNING, LeaseStatus.RELEASED, JobState.SUSPENDED),
        (JobState.RUNNING, LeaseStatus.ABSENT, JobState.SUSPENDED),
        (JobState.SUSPENDED, LeaseStatus.EXPIRED, JobState.SUSPENDED),
        (JobState.COMPLETED, LeaseStatus.ABSENT, JobState.COMPLETED),
        (JobState.FAILED, LeaseStatus.LIVE, JobState.FAILED),
    ],
)
def test_effective_state(state: JobState, lease: LeaseStatus, expected: JobState) -> None:
    assert effective_state(JobRecord(job_id="j", state=state), lease) is expected


def test_create_load_update(store: Store) -> None:
    clock = FakeClock()
    with pytest.raises(ObjectNotFoundError, match="no job at"):
        load_record(store)
    rec = create_record(store, job_id="j1", config={"a": 1}, clock=clock)
    assert load_record(store) == rec and rec.state is JobState.CREATED
    with pytest.raises(AlreadyExistsError):
        create_record(store, job_id="j1", config={"a": 2}, clock=clock)
    clock.advance(5)
    new = update_record(store, lambda r: r.apply(JobEvent.START), clock=clock)
    assert new.state is JobState.RUNNING and new.updated_at == rec.created_at + 5
    assert load_record(store) == new
    # a change that changes nothing writes nothing
    _, version = read_record(store) or (None, None)
    assert update_record(store, lambda r: r, clock=clock) == new
    assert (read_record(store) or (None, None))[1] == version
    # errors from the change propagate at once
    with pytest.raises(InvalidTransitionError):
        update_record(store, lambda r: r.apply(JobEvent.START), clock=clock)


def test_two_concurrent_writers_one_retries(store_url: str, fast_retry: RetryPolicy) -> None:
    """Writer A reads, then B commits before A writes: A's CAS fails, A re-reads and retries."""
    a, b = open_store(store_url, retry=fast_retry), open_store(store_url, retry=fast_retry)
    clock = FakeClock()
    create_record(a, job_id="j", config={}, clock=clock)
    calls = []

    def change_a(rec: JobRecord) -> JobRecord:
        calls.append(dict(rec.extras))
        if len(calls) == 1:  # meanwhile, elsewhere: B's whole read-modify-write
            update_record(b, lambda r: r.with_extras(b=1), clock=clock)
        return rec.with_extras(a=1)

    final = update_record(a, change_a, clock=clock)
    assert calls == [{}, {"b": 1}]  # A ran twice, the second time on B's record
    assert dict(load_record(b).extras) == {"a": 1, "b": 1} == dict(final.extras)
    assert clock.slept and len(clock.slept) == 1  # one backoff, on the fake clock


def test_gives_up_after_bounded_attempts() -> None:
    store = open_store(f"memory://{uuid.uuid4().hex}")
    other = open_store(store.url)
    clock = FakeClock()
    create_record(store, job_id="j", config={}, clock=clock)
    n = 0

    def always_raced(rec: JobRecord) -> JobRecord:
        nonlocal n
        n += 1
        update_record(other, lambda r: r.with_extras(n=n), clock=clock)
        return rec.with_extras(mine=True)

    with pytest.raises(PreconditionFailedError, match="kept changing"):
        update_record(store, always_raced, attempts=3, clock=clock)
    assert n == 3 and "mine" not in load_record(store).extras


def test_threads_lose_no_update(tmp_path: Path) -> None:
    url = str(tmp_path / "job")
    create_record(open_store(url), job_id="j", config={})

    def worker(i: int) -> None:
        s = open_store(url)
        for k in range(5):
            update_record(s, lambda r, key=f"w{i}-{k}": r.with_extras(**{key: True}), attempts=50)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(load_record(open_store(url)).extras) == 15


def test_record_file_is_readable_json(store: Store) -> None:
    create_record(store, job_id="j", config={"x": [1, 2]}, clock=FakeClock())
    text = store.read_bytes(RECORD_KEY).decode()
    assert '"state": "created"' in text and text.endswith("\n")
    rec = dataclasses.replace(load_record(store), state=JobState.RUNNING)
    assert rec.state is JobState.RUNNING


@pytest.mark.parametrize("reason", list(StopReason))
def test_every_stop_reason_round_trips_through_the_record(reason: StopReason) -> None:
    """job.json stores the enum's string value; reading it back gives the same member."""
    rec = JobRecord(job_id="j").apply(JobEvent.START).begin_segment(seg(1))
    rec = rec.end_segment(ended_at=200.0, last_step=3, stop_reason=reason)
    raw = rec.to_json()
    assert f'"stop_reason": "{reason.value}"' in raw.decode()
    back = JobRecord.from_json(raw)
    assert back.history[-1].stop_reason is reason and back == rec
