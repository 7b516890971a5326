"""The watchdog: signals, a GCE preemption notice, stop requests and the budget -> one event."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import FrameType

import pytest

from colabjob.jobs.policy import StopPolicy, StopReason
from colabjob.runner.budget import StopBeforeDeadline
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import Holder
from colabjob.runner.platforms import PlatformInfo
from colabjob.runner.stop_request import (
    STOP_KEY,
    clear_stop_request,
    read_stop_request,
    request_stop,
)
from colabjob.runner.watchdog import Watchdog, watchdog_for
from colabjob.storage import Store, open_store
from tests.fakes import FakeClock
from tests.runner.fake_metadata import fake_metadata

REPO = Path(__file__).resolve().parents[2]
WAIT = 10.0  # upper bound for a real thread or signal to arrive; never a deadline under test


@pytest.fixture
def store() -> Store:
    return open_store(f"memory://{uuid.uuid4().hex}")


def test_is_a_stop_policy() -> None:
    assert isinstance(Watchdog(), StopPolicy)
    wd = Watchdog()
    assert wd.should_stop() is None and not wd.checkpoint_due() and not wd.emergency


def test_sigusr1_sets_the_event_with_reason_signal() -> None:
    previous_calls: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        previous_calls.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        wd = Watchdog(signals=["SIGUSR1", "SIGTERM"]).start()
        assert wd.signals_installed
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wd.event.wait(WAIT)
        assert wd.should_stop() == "signal" and wd.reason is StopReason.SIGNAL
        assert wd.detail == "received SIGUSR1" and not wd.emergency
        wd.close()
        assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored on close
        os.kill(os.getpid(), signal.SIGUSR1)
        assert previous_calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_the_handler_does_no_io() -> None:
    """Run the handler under an audit hook (in a child, so the hook dies with it)."""
    code = """
import signal, sys
from colabjob.runner.watchdog import Watchdog
from colabjob.storage import open_store
wd = Watchdog(store=open_store("memory://audit"), epoch=1,
              stop_poll_seconds=3600, signals=["SIGTERM"]).start()
events, recording = [], [False]
sys.addaudithook(lambda event, args: events.append(event) if recording[0] else None)
recording[0] = True
wd._handler(signal.SIGTERM, None)
recording[0] = False
print(events, wd.should_stop(), wd.detail)
wd.close()
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] signal received SIGTERM"


def test_a_second_ctrl_c_aborts() -> None:
    wd = Watchdog(signals=[])
    wd._handler(signal.SIGINT, None)
    assert wd.should_stop() == "signal" and wd.detail == "received SIGINT"
    with pytest.raises(KeyboardInterrupt):
        wd._handler(signal.SIGINT, None)


def test_no_handlers_outside_the_main_thread() -> None:
    result: list[bool] = []
    before = signal.getsignal(signal.SIGTERM)

    def run() -> None:
        wd = Watchdog(signals=["SIGTERM"]).start()
        result.append(wd.signals_installed)
        wd.close()

    t = threading.Thread(target=run)
    t.start()
    t.join(WAIT)
    assert result == [False] and signal.getsignal(signal.SIGTERM) is before


def test_gce_preemption_notice() -> None:
    with fake_metadata() as fake:
        wd = Watchdog(preemption=True, signals=[], environ={"GCE_METADATA_HOST": fake.host}).start()
        try:
            assert fake.waiting.wait(WAIT)  # the long-poll is parked on the server
            assert wd.should_stop() is None
            fake.preempt()
            assert wd.event.wait(WAIT)
            assert wd.should_stop() == "preemption" and wd.emergency
            assert "preemption notice" in wd.detail
            polls = [r for r in fake.requests if "instance/preempted" in r]
            assert "wait_for_change=true" in polls[-1] and "last_etag=1" in polls[-1]
        finally:
            wd.close()


def test_preempted_before_we_started() -> None:
    with fake_metadata() as fake:
        fake.preempt()
        with Watchdog(preemption=True, signals=[], environ={"GCE_METADATA_HOST": fake.host}) as wd:
            assert wd.event.wait(WAIT) and wd.should_stop() == "preemption"


def test_stop_request_from_another_store_instance(store: Store) -> None:
    with Watchdog(store=store, epoch=0, stop_poll_seconds=0.01, signals=[]) as wd:
        elsewhere = open_store(store.url)  # `colabjob stop JOB` on another machine
        request = request_stop(elsewhere, reason="user asked", requested_by="laptop")
        assert wd.event.wait(WAIT)
        assert wd.should_stop() == "stop_request" and not wd.cancel_requested
        assert wd.detail == "requested by laptop: user asked"
    assert read_stop_request(store) == request
    clear_stop_request(store)
    assert not store.exists(STOP_KEY)


def test_stop_requests_target_the_current_epoch(store: Store) -> None:
    clock = FakeClock()
    old = Lease(store, holder=Holder.here(session_id="old"), clock=clock)
    old.acquire()
    request_stop(store, clock=clock)  # meant for epoch 1 ...
    old.release()
    new = Lease(store, holder=Holder.here(session_id="new"), clock=clock)
    new.acquire()
    wd = Watchdog(store=store, epoch=lambda: new.epoch, signals=[])
    assert not wd.check_stop_request()  # ... not for the runner that resumed later
    request_stop(store, cancel=True, clock=clock)
    assert wd.check_stop_request() and wd.cancel_requested
    assert wd.should_stop() == "stop_request"


def test_without_an_epoch_a_leftover_request_is_ignored(store: Store) -> None:
    request_stop(store)
    wd = Watchdog(store=store, stop_poll_seconds=3600, signals=[]).start()
    try:
        assert not wd.check_stop_request()
        request_stop(store)
        assert wd.check_stop_request()
    finally:
        wd.close()


def test_budget_first_reason_wins_and_preemption_still_raises_emergency() -> None:
    clock = FakeClock()
    wd = Watchdog(
        StopBeforeDeadline(
            clock.time() + 100,
            clock=clock,
            margin=0,
            default_step_seconds=10,
            default_save_seconds=0,
        ),
        signals=[],
    )
    wd.observe_step(10)
    assert wd.should_stop() is None
    clock.advance(90)
    assert wd.should_stop() == "budget" and wd.event.is_set()
    assert "cross the deadline" in wd.detail
    wd.trigger(StopReason.SIGNAL)
    assert wd.should_stop() == "budget" and not wd.emergency
    wd.trigger("preemption", "GCE")
    assert wd.should_stop() == "budget" and wd.emergency
    assert wd.status()["stop_reason"] == "budget"


def test_lease_loss_stops_the_runner() -> None:
    wd = Watchdog(signals=[])
    wd.lease_lost("lost the lease of memory://x")
    assert wd.should_stop() == "stop_request" and "lost the lease" in wd.detail


def test_watchdog_for_a_platform() -> None:
    clock = FakeClock()
    spot = PlatformInfo(name="gce", preemptible=True)
    wd = watchdog_for(spot, clock=clock, checkpoint_every="10m")
    assert wd.preemption and wd.should_stop() is None
    clock.advance(600)
    assert wd.checkpoint_due()
    colab = PlatformInfo(name="colab", tier="free", deadline=clock.time() + 60)
    assert watchdog_for(colab, clock=clock).should_stop() == "budget"
