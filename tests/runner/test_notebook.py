"""The notebook watchdog reads a job's storage (not in-process objects) and shows one line."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

import colabjob.notebook as notebook
from colabjob.notebook import NotebookWatchdog, watchdog
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import Holder
from colabjob.runner.platforms import PlatformInfo
from colabjob.runner.record import create_record, update_record
from colabjob.runner.states import JobEvent
from colabjob.runner.stop_request import read_stop_request
from colabjob.runner.watchdog import Watchdog
from colabjob.storage import Store, open_store
from colabjob.storage.checkpoints import CheckpointStore
from tests.fakes import FakeClock

HOUR = 3600.0


@pytest.fixture
def store() -> Store:
    return open_store(f"memory://{uuid.uuid4().hex}")


def colab(clock: FakeClock, left: float) -> PlatformInfo:
    return PlatformInfo(
        name="colab",
        tier="free",
        limit=12 * HOUR,
        started_at=clock.time() - 12 * HOUR + left,
        deadline=clock.time() + left,
        source="test",
    )


def running_job(store: Store, clock: FakeClock, status: dict[str, Any]) -> Lease:
    """What a runner in a child process leaves in storage (written through its own Store)."""
    child = open_store(store.url)
    create_record(child, job_id="demo", config={"lr": 1}, clock=clock)
    update_record(child, lambda r: r.apply(JobEvent.START), clock=clock)
    lease = Lease(
        child,
        holder=Holder(host="vm", platform="colab", pid=7, session_id="s1"),
        ttl=120,
        clock=clock,
    )
    lease.acquire()
    lease.renew(status)
    CheckpointStore(child).save(100, {"w": b"x"}, epoch=lease.epoch)
    return lease


def test_line_from_storage_only(store: Store) -> None:
    clock = FakeClock()
    running_job(store, clock, {"step": 120, "next_checkpoint_at": clock.time() + 540})
    lines: list[str] = []
    dog = NotebookWatchdog(store, colab(clock, 2 * HOUR), clock=clock, display=lines.append)
    line = dog.tick()
    assert lines == [line]
    assert line == (
        "colabjob demo: RUNNING · step 120 · session 2h00m left (colab-free) · "
        "next checkpoint in 9m00s · last checkpoint step 100 · heartbeat 0s ago"
    )


def test_no_job_yet(store: Store) -> None:
    dog = NotebookWatchdog(store, colab(FakeClock(), HOUR), display=lambda _l: None)
    assert "no job at" in dog.tick()


def test_requests_a_stop_when_the_runner_does_not_know_the_deadline(store: Store) -> None:
    clock = FakeClock()
    lease = running_job(store, clock, {"step": 5})  # no "deadline": started with --budget none
    dog = NotebookWatchdog(
        store, colab(clock, 20 * 60), stop_lead=15 * 60, clock=clock, display=lambda _l: None
    )
    assert "stop requested" not in dog.tick() and read_stop_request(store) is None
    clock.advance(5 * 60)
    lease.renew({"step": 9})
    assert dog.tick().endswith("stop requested")
    request = read_stop_request(store)
    assert request is not None and request.epoch == lease.epoch and "15m00s left" in request.reason
    # the runner (another process) sees it through its own watchdog
    runner = Watchdog(store=open_store(store.url), epoch=lease.epoch, signals=[])
    assert runner.check_stop_request() and runner.should_stop() == "stop_request"
    dog.tick()
    assert read_stop_request(store) == request  # written once


def test_leaves_a_runner_that_knows_the_deadline_alone(store: Store) -> None:
    clock = FakeClock()
    session = colab(clock, 10 * 60)
    running_job(store, clock, {"step": 5, "deadline": session.deadline})
    dog = NotebookWatchdog(store, session, stop_lead=15 * 60, clock=clock, display=lambda _l: None)
    dog.tick()
    assert read_stop_request(store) is None


def test_a_silent_runner_shows_as_suspended_after_the_ttl(store: Store) -> None:
    clock = FakeClock()
    running_job(store, clock, {"step": 5})
    dog = NotebookWatchdog(
        store, colab(clock, 5 * HOUR), stop_lead=None, clock=clock, display=lambda _l: None
    )
    assert "RUNNING" in dog.tick()
    clock.advance(121)  # no heartbeat for longer than the TTL, watched on our own clock
    line = dog.tick()
    assert line.startswith("colabjob demo: SUSPENDED (runner lost: lease expired)")
    assert "heartbeat" not in line


def test_watchdog_returns_at_once_and_updates_from_a_thread(store: Store) -> None:
    clock = FakeClock()
    running_job(store, clock, {"step": 3})
    lines: list[str] = []
    seen = threading.Event()

    def show(line: str) -> None:
        lines.append(line)
        if "step 3" in line:
            seen.set()

    dog = watchdog(store, refresh=0.01, session=colab(clock, HOUR), clock=clock, display=show)
    try:
        assert lines and lines[0].startswith("colabjob: watching")
        assert seen.wait(10)  # waiting for a real thread, not for a deadline
        assert "watching" in repr(dog)
    finally:
        dog.stop()
    assert "stopped" in repr(dog)


def test_storage_errors_are_shown_not_raised(store: Store) -> None:
    class Broken:
        url = "memory://broken"

        def read_versioned(self, key: str) -> None:
            raise OSError("Transport endpoint is not connected")

    dog = NotebookWatchdog(Broken(), colab(FakeClock(), HOUR), display=lambda _l: None)  # type: ignore[arg-type]
    assert "cannot read memory://broken (OSError" in dog.tick() and dog.error is not None


def test_ipython_display_handle_is_updated(monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython
    import IPython.display

    shown: list[tuple[str, Any]] = []

    class Handle:
        def update(self, obj: Any) -> None:
            shown.append(("update", obj.data))

    def display(obj: Any, display_id: bool = False) -> Handle:
        shown.append(("display", obj.data))
        return Handle()

    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", display)
    show = notebook._default_display()
    show("one")
    show("two")
    assert shown == [("display", "one"), ("update", "two")]


def test_plain_print_outside_ipython(capsys: pytest.CaptureFixture[str]) -> None:
    notebook._default_display()("hello")
    assert capsys.readouterr().out == "hello\n"
