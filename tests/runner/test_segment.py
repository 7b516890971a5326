"""A segment end to end: the record's history and state, the lease, fencing, signals.

``colabjob.session`` runs in-process over memory stores with a fake clock (the budget stop
is driven by advancing it, never by waiting); a SIGTERM is delivered to a real child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import colabjob
from colabjob.config import config_hash, spec_from_text
from colabjob.errors import JobStateError, StaleEpochError
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.policy import StopReason
from colabjob.jobs.session import Session
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import Holder, read_lease
from colabjob.runner.record import JobRecord, load_record
from colabjob.runner.segment import SegmentOptions, run_segment
from colabjob.runner.signals import forget_completion
from colabjob.runner.states import JobState
from colabjob.runner.stop_request import request_stop
from colabjob.runner.watchdog import Watchdog
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore
from tests.fakes import FakeClock
from tests.jobs.helpers import TinyNet, train_tiny

REPO = Path(__file__).resolve().parents[2]
WAIT = 60.0  # bound for a child process to get somewhere; never a deadline under test


@pytest.fixture
def url() -> str:
    return f"memory://segment-{uuid.uuid4().hex}"


def _session(url: str, clock: FakeClock, **kw: Any) -> Any:
    kw.setdefault("platform", "local")
    return colabjob.session(url, clock=clock, log=None, **kw)


def test_history_has_one_segment_per_session_with_its_stop_reason(url: str) -> None:
    clock = FakeClock()
    store = open_store(url)
    with _session(url, clock, budget="1h", every_steps=10) as s:  # stops on the budget
        train_tiny(s, clock=clock)
    first = load_record(store)
    assert first.state is JobState.SUSPENDED and s.outcome.stop_reason == "budget"
    assert clock.time() < first.history[0].started_at + 3600  # stopped before the deadline
    budget_step = s.outcome.last_step
    assert s.outcome.checkpoint_step == budget_step > 10

    def ask_to_stop(sess: Session) -> None:
        if sess.global_step == budget_step + 3:
            request_stop(store, clock=clock)
            policy = sess.ctx.policy
            assert isinstance(policy, Watchdog) and policy.check_stop_request()

    with _session(url, clock) as s:
        train_tiny(s, after=ask_to_stop)
    assert s.outcome.stop_reason == "stop_request" and s.outcome.last_step == budget_step + 4

    with _session(url, clock, max_steps=budget_step + 6) as s:
        train_tiny(s)
    record = load_record(store)
    assert record.state is JobState.COMPLETED
    assert [seg.stop_reason for seg in record.history] == [
        StopReason.BUDGET,
        StopReason.STOP_REQUEST,
        StopReason.COMPLETED,
    ]
    assert [(seg.first_step, seg.last_step) for seg in record.history] == [
        (0, budget_step),
        (budget_step, budget_step + 4),
        (budget_step + 4, budget_step + 6),
    ]
    assert [seg.epoch for seg in record.history] == [1, 2, 3] and record.epoch == 3
    assert all(seg.ended_at is not None and seg.error is None for seg in record.history)
    lease = read_lease(store)
    assert lease is not None and lease[0].released
    with pytest.raises(JobStateError, match="completed"), _session(url, clock):
        pass


def test_a_second_live_session_is_refused(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    with _session(url, clock, max_steps=2) as s:
        before = load_record(open_store(url))
        with pytest.raises(SystemExit) as info, _session(url, clock):
            pass  # a script: the CLI's message (LeaseHeldError's) and exit 2
        err = capsys.readouterr().err
        assert info.value.code == 2 and "already running on" in err and "force=True" in err
        assert load_record(open_store(url)) == before  # the refused session changed nothing
        train_tiny(s)
    assert load_record(open_store(url)).state is JobState.COMPLETED


def test_a_runner_that_lost_its_lease_cannot_commit(url: str) -> None:
    clock = FakeClock()
    store = open_store(url)
    with pytest.raises(StaleEpochError, match="epoch 1"), _session(url, clock) as s:
        s.track(model=TinyNet(), batch_size=4)
        s.step()
        thief = Lease(
            store, holder=Holder(host="b", platform="gce", pid=1, session_id="b"), clock=clock
        )
        thief.acquire(force=True)  # watches the lease for its TTL on the fake clock
        assert thief.epoch == 2
        s.save(final=True)
    assert CheckpointStore(store).list() == []
    record = load_record(store)
    assert record.state is JobState.RUNNING and record.epoch == 2  # left to the new holder
    lease = read_lease(store)
    assert lease is not None and lease[0].holder.session_id == "b" and not lease[0].released


def test_an_exception_fails_the_job_and_a_resume_continues(url: str) -> None:
    clock = FakeClock()

    def boom(s: Session) -> None:
        if s.global_step == 3:
            raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"), _session(url, clock, every_steps=2) as s:
        train_tiny(s, after=boom)
    record = load_record(open_store(url))
    assert record.state is JobState.FAILED
    seg = record.history[-1]
    assert seg.stop_reason is StopReason.CRASH and "ValueError: bad batch" in (seg.error or "")
    assert seg.last_step == 3 and s.outcome.checkpoint_step == 2
    lease = read_lease(open_store(url))
    assert lease is not None and lease[0].released

    with _session(url, clock, max_steps=5) as s:
        train_tiny(s)
        assert s.first_step == 2
    assert load_record(open_store(url)).state is JobState.COMPLETED


def test_a_cancel_request_cancels_the_job(url: str) -> None:
    clock = FakeClock()
    store = open_store(url)

    def cancel(s: Session) -> None:
        if s.global_step == 2:
            request_stop(store, cancel=True, clock=clock)
            assert s.ctx.policy.check_stop_request()  # type: ignore[attr-defined]

    with _session(url, clock) as s:
        train_tiny(s, after=cancel)
    assert load_record(store).state is JobState.CANCELLED
    assert CheckpointStore(store).latest().step == 3  # type: ignore[union-attr]


def test_the_store_is_flushed_after_the_lease_is_released(url: str) -> None:
    store = open_store(url)
    seen: list[bool] = []

    def flush() -> None:
        lease = read_lease(store)
        seen.append(lease is not None and lease[0].released)

    store.flush = flush  # type: ignore[method-assign]
    with colabjob.session(store, platform="local", max_steps=1, log=None) as s:
        train_tiny(s)
    assert seen == [True]


def _spec(every_steps: int = 2, max_steps: int = 4) -> Any:
    return spec_from_text(
        f"""
job: {{name: seg-test, kind: python, entrypoint: "train:main"}}
training: {{max_steps: {max_steps}, log_every_steps: 1}}
checkpoint: {{every_steps: {every_steps}, every_minutes: null}}
budget: {{platform: local}}
"""
    )


def test_run_segment_builds_the_context_from_the_spec(url: str, monkeypatch: Any) -> None:
    from colabjob.jobs import kinds

    seen: list[SegmentContext] = []

    def fake_kind(spec: Any, ctx: SegmentContext) -> SegmentOutcome:
        seen.append(ctx)
        with Session(ctx) as s:
            train_tiny(s)
        assert s.outcome is not None
        return s.outcome

    monkeypatch.setattr(kinds, "run_kind", fake_kind)
    spec = _spec()
    out = run_segment(url, spec, options=SegmentOptions(log=None))
    assert out.completed and out.last_step == 4
    (ctx,) = seen
    assert (ctx.every_steps, ctx.max_steps, ctx.log_every_steps) == (2, 4, 1)
    assert ctx.config_hash == config_hash(spec) and ctx.epoch == 1
    record = load_record(open_store(url))
    assert record.state is JobState.COMPLETED and record.config == spec.to_dict()
    info = CheckpointStore(open_store(url)).latest()
    assert info is not None and info.manifest["config_hash"] == config_hash(spec)

    def broken(spec: Any, ctx: SegmentContext) -> SegmentOutcome:
        raise ImportError("no module named train")

    monkeypatch.setattr(kinds, "run_kind", broken)
    other = f"{url}-2"
    with pytest.raises(ImportError):
        run_segment(other, spec, options=SegmentOptions(log=None))
    record = load_record(open_store(other))
    assert record.state is JobState.FAILED and "ImportError" in (record.history[-1].error or "")


def _wait_for(predicate: Any, what: str) -> None:
    end = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling a child's progress, not a deadline under test


def test_sigterm_mid_training_commits_and_suspends(tmp_path: Path) -> None:
    root = tmp_path / "job"
    cmd = [
        sys.executable, "-m", "tests.jobs.equiv_child", str(root), "--config", "plain",
        "--total", "100000", "--every", "3", "--slow", "0.005",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        store = open_store(root)
        ckpts = CheckpointStore(store)
        _wait_for(lambda: ckpts.list(), "the first periodic checkpoint")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert b"done signal" in stdout
    record: JobRecord = load_record(store)
    seg = record.history[-1]
    assert record.state is JobState.SUSPENDED and seg.stop_reason is StopReason.SIGNAL
    latest = ckpts.latest()
    assert latest is not None and latest.step == seg.last_step and seg.last_step >= 3
    assert latest.epoch == seg.epoch == 1


@pytest.fixture(autouse=True)
def _no_stray_handlers() -> Iterator[None]:
    """Each session restores the signal handlers it installed (except, by design, a
    completed job's note-and-survive ones, put back here: ``runner.signals``)."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    forget_completion([signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
    assert signal.getsignal(signal.SIGTERM) is before
