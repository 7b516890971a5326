"""How fast and how safely a run stops (issue 11): a ``colabjob stop`` request on local or
memory storage is seen at a step boundary within ``stop_check_seconds`` of the injected
clock (a fake one here: asserted in steps, never in wall time), and the file is read again
only when it changes; a budget that leaves nothing after the margin is refused before
anything is written, one that leaves room commits a checkpoint; once the job is COMPLETED,
a stop signal is noted and survived (the user's code after training still runs)."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import colabjob
from colabjob.errors import ConfigError
from colabjob.runner.budget import check_budget_fits
from colabjob.runner.record import load_record, read_record
from colabjob.runner.states import JobState
from colabjob.runner.stop_request import request_stop
from colabjob.runner.watchdog import Watchdog
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.local import LocalStore
from colabjob.storage.store import open_store
from tests.fakes import FakeClock
from tests.jobs.helpers import train_tiny

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@pytest.fixture
def default_handlers() -> Iterator[None]:
    """Put the interpreter's own handlers back after a test that leaves others installed."""
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


class CountingStore(LocalStore):
    """A local store that counts reads of the stop request."""

    reads = 0

    def read_versioned(self, key: str) -> Any:
        if key == "control/stop.json":
            CountingStore.reads += 1
        return super().read_versioned(key)


def test_a_stop_request_is_seen_at_a_boundary_within_the_check_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    store = CountingStore(str(tmp_path / "job"))
    dog = Watchdog(clock=clock, store=store, epoch=0, stop_poll_seconds=3600).start()
    try:
        assert dog.should_stop() is None  # checked now (nothing there); next in 1 s
        request_stop(open_store(tmp_path / "job"), reason="from the laptop")  # another process
        clock.advance(0.5)
        assert dog.should_stop() is None  # rate-limited: no stat, no read yet
        clock.advance(0.5)
        assert dog.should_stop() == "stop_request"
        assert "from the laptop" in dog.detail
    finally:
        dog.close()


def test_an_ignored_request_is_read_once_until_it_changes(tmp_path: Path) -> None:
    clock = FakeClock()
    store = CountingStore(str(tmp_path / "job"))
    request_stop(store)  # lease epoch 0: meant for an earlier runner
    dog = Watchdog(clock=clock, store=store, epoch=2, stop_poll_seconds=3600).start()
    try:
        CountingStore.reads = 0
        for _ in range(10):
            assert dog.should_stop() is None
            clock.advance(1.0)
        assert CountingStore.reads == 1  # then only a stat per second
        os.remove(tmp_path / "job" / "control" / "stop.json")
        dog.should_stop()
        clock.advance(1.0)
        request_stop(store)  # the lease file is absent: epoch 0 again, still not ours
        dog.should_stop()
        assert CountingStore.reads == 2
    finally:
        dog.close()


def test_session_stops_within_a_few_steps_of_a_request(default_handlers: None) -> None:
    url = f"memory://stop-{uuid.uuid4().hex}"
    clock = FakeClock()
    asked: list[int] = []

    def ask(s: Any) -> None:
        if s.global_step == 7 and not asked:
            request_stop(open_store(url), clock=clock)  # as `colabjob stop` does
            asked.append(s.global_step)

    with colabjob.session(url, clock=clock, platform="local", log=None, stop_poll_seconds=3600,
                          every_minutes=None, max_steps=10_000) as s:  # fmt: skip
        train_tiny(s, clock=clock, step_seconds=0.25, after=ask)
    out = s.outcome
    assert out.stop_reason == "stop_request" and not out.completed
    assert 0 < out.last_step - asked[0] <= 5  # 1 s of 0.25 s steps, plus the step it lands in
    assert out.checkpoint_step == out.last_step
    assert load_record(open_store(url)).state is JobState.SUSPENDED


def test_budget_not_longer_than_the_margin_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        check_budget_fits(20.0, margin="5m")
    assert "5m00s margin" in str(e.value) and "--margin 2s" in (e.value.hint or "")
    with pytest.raises(ConfigError, match="save guess"):
        check_budget_fits(60.0, margin="30s", save_guess="30s")
    check_budget_fits(60.0, margin="30s", save_guess="20s")
    check_budget_fits(None, margin="5m")  # no limit: nothing to check


def test_session_with_a_too_short_budget_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(tmp_path / "job")
    session = colabjob.session(url, budget="20s", margin="5m", platform="local", log=None,
                               clock=FakeClock())  # fmt: skip
    with pytest.raises(SystemExit) as e, session:  # a script: the CLI's one line and exit 2
        raise AssertionError("not reached")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "5m00s margin" in err and "margin=" in err
    record = read_record(open_store(url))
    assert record is None or record[0].state is JobState.CREATED
    assert CheckpointStore(open_store(url)).latest() is None


def test_a_short_budget_with_a_small_margin_commits_a_checkpoint(default_handlers: None) -> None:
    url = f"memory://short-{uuid.uuid4().hex}"
    clock = FakeClock()
    with colabjob.session(url, budget="20s", margin="2s", platform="local", log=None,
                          clock=clock, every_minutes=None) as s:  # fmt: skip
        train_tiny(s, clock=clock, step_seconds=1.0)
    out = s.outcome
    assert out.stop_reason == "budget" and 10 < out.last_step < 20
    assert out.checkpoint_step == out.last_step
    info = CheckpointStore(open_store(url)).latest()
    assert info is not None and info.step == out.last_step


def test_a_completed_job_survives_later_stop_signals(
    default_handlers: None, capfd: pytest.CaptureFixture[str]
) -> None:
    url = f"memory://done-{uuid.uuid4().hex}"
    clock = FakeClock()
    with colabjob.session(url, clock=clock, platform="local", log=None, max_steps=4) as s:
        train_tiny(s, clock=clock, step_seconds=1.0)
    assert s.outcome.completed
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. during the user's save_model()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C too
    err = capfd.readouterr().err
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        assert f"received {name} after the job completed; finishing" in err
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still aborts
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.01)  # a point where Python runs the handler
    assert load_record(open_store(url)).state is JobState.COMPLETED


def test_a_paused_job_restores_the_defaults_and_a_users_handler_is_kept(
    default_handlers: None,
) -> None:
    def mine(signum: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGUSR1, mine)
    url = f"memory://kept-{uuid.uuid4().hex}"
    clock = FakeClock()
    with colabjob.session(url, clock=clock, platform="local", log=None, max_steps=3) as s:
        train_tiny(s, clock=clock, step_seconds=1.0)
    assert s.outcome.completed
    assert signal.getsignal(signal.SIGUSR1) is mine  # the user's own handler stays
    with colabjob.session(f"{url}-2", clock=clock, platform="local", log=None,
                          budget="1h", margin="59m") as s:  # fmt: skip
        train_tiny(s, clock=clock, step_seconds=30.0)
    assert not s.outcome.completed
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # paused: nothing survives it
