"""The lease: one live runner per job, expiry on the reader's clock, takeover and fencing."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from colabjob.errors import (
    LeaseHeldError,
    LeaseLostError,
    StaleEpochError,
    TransientStorageError,
)
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import LEASE_KEY, Holder, LeaseObserver, read_lease
from colabjob.runner.record import create_record, load_record
from colabjob.runner.states import LeaseStatus
from colabjob.storage import Store, open_store
from colabjob.storage.checkpoints import CheckpointStore
from tests.fakes import FakeClock

REPO = Path(__file__).resolve().parents[2]
TTL = 60.0


@pytest.fixture
def store() -> Store:
    return open_store(f"memory://{uuid.uuid4().hex}")


def lease(store: Store, clock: FakeClock, name: str, **kw: Any) -> Lease:
    holder = Holder(host=f"host-{name}", platform="colab", pid=100, session_id=name)
    return Lease(store, holder=holder, ttl=TTL, clock=clock, poll_seconds=5.0, **kw)


def test_acquire_writes_the_lease_and_the_record_epoch(store: Store) -> None:
    clock = FakeClock()
    create_record(store, job_id="j", config={}, clock=clock)
    a = lease(store, clock, "a")
    info = a.acquire()
    assert (info.epoch, a.epoch, a.held, a.current_epoch()) == (1, 1, True, 1)
    got = read_lease(store)
    assert got is not None and got[0] == info and got[0].holder.host == "host-a"
    assert load_record(store).epoch == 1
    assert b'"epoch": 1' in store.read_bytes(LEASE_KEY)


def test_a_second_runner_is_told_who_holds_the_job(store: Store) -> None:
    clock = FakeClock(1_700_000_000.0)
    lease(store, clock, "a").acquire()
    clock.advance(30)
    with pytest.raises(LeaseHeldError) as info:
        lease(store, clock, "b").acquire()
    text = str(info.value)
    assert "already running on host-a (colab, pid 100, session a)" in text
    assert "since 2023-11-14 22:13:20Z" in text and "last heartbeat 30s ago" in text
    assert "expires at 2023-11-14 22:14:20Z" in text
    assert "--force" in (info.value.hint or "") and info.value.exit_code == 2
    assert clock.slept == []  # a live lease is refused at once, without waiting


def test_renew_and_observer_expiry_on_the_readers_clock(store: Store) -> None:
    clock = FakeClock()
    a = lease(store, clock, "a")
    observer = LeaseObserver(store, clock=clock)
    assert observer.poll() == (None, LeaseStatus.ABSENT)
    a.acquire()
    assert observer.poll()[1] is LeaseStatus.LIVE
    clock.advance(TTL - 1)
    assert observer.poll()[1] is LeaseStatus.LIVE
    info = a.renew({"step": 7})
    assert info.beats == 1 and info.status == {"step": 7}
    assert observer.poll()[1] is LeaseStatus.LIVE  # it changed: the watch restarts from here
    clock.advance(TTL - 1)
    assert observer.poll()[1] is LeaseStatus.LIVE and observer.unchanged_for == TTL - 1
    clock.advance(1)
    seen, status = observer.poll()
    assert status is LeaseStatus.EXPIRED and seen is not None and seen.status == {"step": 7}
    a.release()
    assert observer.poll()[1] is LeaseStatus.RELEASED


def test_stale_by_wall_clock_is_only_a_hint(store: Store) -> None:
    holder_clock = FakeClock(1_700_000_000.0 - 3600)  # the holder's wall clock is an hour behind
    reader_clock = FakeClock(1_700_000_000.0)
    a = lease(store, holder_clock, "a")
    a.acquire()
    assert LeaseObserver(store, clock=reader_clock).poll()[1] is LeaseStatus.STALE
    # the lease looks stale, but the holder heartbeats while we watch: no takeover
    reader_clock.on_sleep = lambda _s: a.renew()
    with pytest.raises(LeaseHeldError, match="advanced while we watched"):
        lease(store, reader_clock, "b").acquire()
    assert a.renew().epoch == 1


def test_takeover_after_expiry_bumps_the_epoch_and_fences_the_old_runner(store: Store) -> None:
    clock = FakeClock()
    create_record(store, job_id="j", config={}, clock=clock)
    a, b = lease(store, clock, "a"), lease(store, clock, "b")
    a.acquire()
    clock.advance(TTL + 1)  # a stopped heartbeating (paused, or its VM vanished)
    info = b.acquire()
    assert sum(clock.slept) >= TTL  # expiry confirmed on b's own clock before the takeover
    assert info.epoch == 2 and load_record(store).epoch == 2
    with pytest.raises(LeaseLostError, match="now held by host-b") as lost:
        a.renew()
    assert isinstance(lost.value, LeaseHeldError) and not a.held and a.epoch == 1
    assert a.current_epoch() == 2  # what a's commit fence will see
    ckpts = CheckpointStore(store, fence=a.current_epoch)
    with pytest.raises(StaleEpochError):
        ckpts.save(10, {"w": b"late"}, epoch=a.epoch)
    assert ckpts.save(10, {"w": b"new"}, epoch=b.epoch).step == 10
    a.release()  # a no-op now: nothing of a's to release
    assert b.renew().holder.session_id == "b"


def test_force_takes_over_only_after_confirming_expiry(store: Store) -> None:
    clock = FakeClock()
    a, b = lease(store, clock, "a"), lease(store, clock, "b")
    a.acquire()
    clock.on_sleep = lambda _s: a.renew()  # a is alive
    with pytest.raises(LeaseHeldError, match="advanced while we watched"):
        b.acquire(force=True)
    assert a.renew().epoch == 1 and not b.held
    clock.on_sleep = None  # a froze: force now succeeds after one TTL of watching
    clock.slept.clear()
    assert b.acquire(force=True).epoch == 2
    assert sum(clock.slept) == pytest.approx(TTL)


def test_release_hands_over_at_once(store: Store) -> None:
    clock = FakeClock()
    a, b = lease(store, clock, "a"), lease(store, clock, "b")
    with a:
        assert a.held
    assert not a.held
    assert b.acquire().epoch == 2 and clock.slept == []
    # the same session re-acquiring (e.g. a restarted child) needs no wait either
    assert lease(store, clock, "b").acquire().epoch == 3


def test_epoch_continues_from_the_record_when_the_lease_file_is_gone(store: Store) -> None:
    clock = FakeClock()
    create_record(store, job_id="j", config={}, clock=clock)
    a = lease(store, clock, "a")
    a.acquire()
    a.release()
    store.delete(LEASE_KEY)
    assert lease(store, clock, "b").acquire().epoch == 2


def test_heartbeat_reports_a_lost_lease_once(store: Store) -> None:
    clock = FakeClock()
    a, b = lease(store, clock, "a"), lease(store, clock, "b")
    a.acquire()
    lost: list[str] = []
    beat = a.start_heartbeat(interval=3600, on_lost=lost.append)  # the thread never fires here
    try:
        assert beat.beat() and beat.beats == 1
        b.acquire(force=True)
        assert not beat.beat() and not beat.beat()
        assert len(lost) == 1 and "now held by host-b" in lost[0]
    finally:
        beat.stop()


class FlakyReplace:
    """Delegates to a store, but ``replace`` fails transiently while ``broken`` is set."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.broken = inner, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def replace(self, key: str, data: bytes, expected: Any) -> Any:
        if self.broken:
            raise TransientStorageError("Transport endpoint is not connected")
        return self.inner.replace(key, data, expected)


def test_heartbeat_survives_transient_errors_until_the_ttl(store: Store) -> None:
    clock = FakeClock()
    flaky = FlakyReplace(store)
    a = Lease(flaky, holder=Holder.here(session_id="a"), ttl=TTL, clock=clock)  # type: ignore[arg-type]
    a.acquire()
    lost: list[str] = []
    beat = a.start_heartbeat(interval=3600, on_lost=lost.append)
    try:
        flaky.broken = True
        clock.advance(TTL - 1)
        assert beat.beat() and not lost and isinstance(beat.last_error, TransientStorageError)
        flaky.broken = False
        assert beat.beat()
        flaky.broken = True
        clock.advance(TTL)
        assert not beat.beat() and "could not renew the lease for 1m00s" in lost[0]
    finally:
        beat.stop()


def test_heartbeat_thread_renews_with_status() -> None:
    store = open_store(f"memory://{uuid.uuid4().hex}")
    a = Lease(store, holder=Holder.here(session_id="a"), ttl=5.0)
    a.acquire()
    beat = a.start_heartbeat(interval=0.01, status=lambda: {"step": 42})
    try:
        give_up = time.monotonic() + 10  # waiting for a real thread, not for a deadline
        while beat.beats < 3 and time.monotonic() < give_up:
            time.sleep(0.01)
        assert beat.beats >= 3 and beat.lost is None
    finally:
        beat.stop()
    got = read_lease(store)
    assert got is not None and got[0].status == {"step": 42} and got[0].beats >= 3


# -- real processes ---------------------------------------------------------------------------
@pytest.fixture(params=["local", "gcs", "s3"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "job")
    return str(request.getfixturevalue(f"{request.param}_bucket"))


@pytest.mark.slow
def test_processes_racing_for_one_job_exactly_one_wins(shared_url: str) -> None:
    from tests.runner.lease_child import race

    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=race, args=(shared_url, i, barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(30)
    kinds = sorted(o[0] for o in outcomes)
    assert kinds == ["held"] + ["held"] * (n - 2) + ["won"], outcomes
    winner = next(o for o in outcomes if o[0] == "won")
    assert winner[2] == 1
    for o in outcomes:
        if o[0] == "held":
            assert f"session racer{winner[1]}" in o[2]


@pytest.mark.slow
def test_a_frozen_holder_loses_the_lease_and_its_late_commit_is_fenced(shared_url: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.runner.lease_child", "hold", shared_url],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None

    def ask(command: str) -> str:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(command + "\n")
        child.stdin.flush()
        return child.stdout.readline().strip()

    try:
        assert child.stdout.readline().strip() == "acquired 1"
        os.kill(child.pid, signal.SIGSTOP)
        store = open_store(shared_url)
        clock = FakeClock(time.time())
        with pytest.raises(LeaseHeldError, match="session holder"):
            lease(store, clock, "taker").acquire()  # looks alive by its wall clock: refused
        taker = lease(store, clock, "taker")
        assert taker.acquire(force=True).epoch == 2  # watched a full TTL: nothing moved
        os.kill(child.pid, signal.SIGCONT)
        assert ask("beat").startswith("lost LeaseLostError")
        assert ask("commit 5").startswith(
            "fenced checkpoint of step 5 was written under lease epoch 1"
        )
        assert CheckpointStore(store).list() == []
        ask("quit")
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait(10)
