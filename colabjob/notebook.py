"""The notebook watchdog cell: a live status line for a job, from its storage alone.

``colabjob.watchdog(job_url)`` returns at once, starts a daemon thread and keeps one line up
to date (an ``IPython.display`` handle in Jupyter/Colab, plain prints elsewhere): job state,
step, time left in this session, the next and last checkpoint, the runner's heartbeat. It
reads only what the runner writes to storage (``job.json``, the lease and its heartbeat
status, checkpoints, the stop request), so it works the same whether training runs in this
kernel or in a child started with ``!colabjob start``. When the session's end is near and the
runner does not know that deadline itself, it writes a stop request so the runner
checkpoints in time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.runner.lease.info import LeaseObserver
from colabjob.runner.platforms import (
    PlatformInfo,
    describe_platform,
    format_duration,
    parse_duration,
)
from colabjob.runner.record import effective_state, read_record
from colabjob.runner.states import JobState, LeaseStatus
from colabjob.runner.stop_request import read_stop_request, request_stop
from colabjob.storage.manifest import CKPT_DIR, MANIFEST, parse_dir

if TYPE_CHECKING:
    from colabjob.storage.store import Store

log = logging.getLogger(__name__)

__all__ = ["JobView", "NotebookWatchdog", "watchdog"]


@dataclass(frozen=True, kw_only=True)
class JobView:
    """What the watchdog line shows, read from storage at one moment."""

    url: str
    now: float
    job_id: str | None = None
    state: JobState | None = None  # effective state (RUNNING without a live lease: SUSPENDED)
    lease: LeaseStatus = LeaseStatus.ABSENT
    holder: str | None = None
    heartbeat_age: float | None = None
    step: int | None = None
    session_left: float | None = None
    platform: str = ""
    runner_deadline: float | None = None
    next_checkpoint_at: float | None = None
    last_checkpoint_step: int | None = None
    stop_requested: bool = False

    def line(self) -> str:
        if self.state is None:
            return f"colabjob: no job at {self.url} yet (waiting for `colabjob start`)"
        parts = [f"colabjob {self.job_id}: {self.state.value.upper()}"]
        if self.state is JobState.SUSPENDED and self.lease is LeaseStatus.EXPIRED:
            parts[0] += " (runner lost: lease expired)"
        if self.step is not None:
            parts.append(f"step {self.step}")
        if self.session_left is not None:
            parts.append(f"session {format_duration(self.session_left)} left ({self.platform})")
        if self.next_checkpoint_at is not None and self.state is JobState.RUNNING:
            parts.append(
                f"next checkpoint in {format_duration(self.next_checkpoint_at - self.now)}"
            )
        if self.last_checkpoint_step is not None:
            parts.append(f"last checkpoint step {self.last_checkpoint_step}")
        if self.heartbeat_age is not None and self.lease in (LeaseStatus.LIVE, LeaseStatus.STALE):
            parts.append(f"heartbeat {format_duration(max(0.0, self.heartbeat_age))} ago")
        if self.stop_requested and self.state is JobState.RUNNING:
            parts.append("stop requested")
        return " · ".join(parts)


def last_checkpoint_step(store: Store, *, probe: int = 3) -> int | None:
    """The newest committed step, by directory name (manifest present); no verification."""
    steps = sorted(
        (parsed[0], name)
        for name in store.list_dirs(CKPT_DIR)
        if (parsed := parse_dir(name)) is not None
    )
    for step, name in reversed(steps[-probe:]):
        if store.exists(f"{CKPT_DIR}/{name}/{MANIFEST}"):
            return step
    return None


class NotebookWatchdog:
    """Reads a job's storage every ``refresh`` seconds and shows one line."""

    def __init__(
        self,
        store: Store,
        session: PlatformInfo,
        *,
        refresh: float = 30.0,
        stop_lead: float | None = 15 * 60.0,
        clock: Clock = SYSTEM_CLOCK,
        display: Callable[[str], None] | None = None,
    ) -> None:
        self.store, self.session, self.clock = store, session, clock
        self.refresh, self.stop_lead = float(refresh), stop_lead
        self.display = display or _default_display()
        self.observer = LeaseObserver(store, clock=clock)
        self.requested_stop = False
        self.last: JobView | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> JobView:
        now = self.clock.time()
        base: dict[str, Any] = {
            "url": self.store.url,
            "now": now,
            "session_left": self.session.time_left(now),
            "platform": f"{self.session.name}-{self.session.tier}"
            if self.session.tier
            else self.session.name,
        }
        got = read_record(self.store)
        if got is None:
            return JobView(**base)
        record = got[0]
        info, lease = self.observer.poll()
        status = dict(info.status) if info else {}
        stop = read_stop_request(self.store)
        return JobView(
            **base,
            job_id=record.job_id,
            state=effective_state(record, lease),
            lease=lease,
            holder=info.holder.describe() if info else None,
            heartbeat_age=(now - info.heartbeat_at) if info else None,
            step=status.get("step", record.last_step),
            runner_deadline=status.get("deadline"),
            next_checkpoint_at=status.get("next_checkpoint_at"),
            last_checkpoint_step=last_checkpoint_step(self.store),
            stop_requested=stop is not None and info is not None and stop.epoch >= info.epoch,
        )

    def _maybe_request_stop(self, view: JobView) -> JobView:
        left = view.session_left
        if (
            self.stop_lead is None
            or self.requested_stop
            or view.stop_requested
            or left is None
            or left > self.stop_lead
            or view.state is not JobState.RUNNING
            or self.session.deadline is None
        ):
            return view
        # A runner that knows this deadline stops predictively on its own; only step in
        # when it does not (e.g. a child started without the platform's budget).
        if view.runner_deadline is not None and view.runner_deadline <= self.session.deadline + 60:
            return view
        request_stop(
            self.store,
            reason=f"notebook watchdog: {format_duration(left)} left in the session",
            clock=self.clock,
        )
        self.requested_stop = True
        return dataclasses.replace(view, stop_requested=True)

    def tick(self) -> str:
        """Read, maybe request a stop, show and return the line (what the thread repeats)."""
        try:
            view = self._maybe_request_stop(self.snapshot())
            self.last, self.error = view, None
            line = view.line()
        except Exception as e:  # keep watching through storage hiccups; say so on the line
            self.error = e
            line = f"colabjob: cannot read {self.store.url} ({type(e).__name__}: {e}); retrying"
        self.display(line)
        return line

    def _run(self) -> None:
        while True:
            self.tick()
            if self._stop.wait(self.refresh):
                return

    def start(self) -> NotebookWatchdog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="colabjob-notebook", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def request_stop(self, *, cancel: bool = False) -> None:
        """Ask the job's runner to checkpoint and stop now (``cancel``: and not resume)."""
        request_stop(self.store, cancel=cancel, reason="notebook watchdog", clock=self.clock)
        self.requested_stop = True

    def __repr__(self) -> str:
        state = "watching" if self._thread and self._thread.is_alive() else "stopped"
        return f"<colabjob watchdog {state} {self.store.url}>"


def watchdog(
    job_url: str | Store,
    *,
    refresh: float | str = 30.0,
    stop_lead: float | str | None = "15m",
    budget: str | float | None = None,
    session_started_at: str | float | None = None,
    platform: str | None = None,
    session: PlatformInfo | None = None,
    clock: Clock = SYSTEM_CLOCK,
    display: Callable[[str], None] | None = None,
) -> NotebookWatchdog:
    """Watch a job from a notebook cell; returns at once with the running watchdog.

    ``budget``/``session_started_at``/``platform`` override what is detected about this
    session (as on the command line). ``stop_lead``: when the session has this little left
    and the runner does not know the deadline itself, write a stop request (None: never).
    """
    from colabjob.storage.store import Store, open_store

    store = job_url if isinstance(job_url, Store) else open_store(job_url)
    info = session or describe_platform(
        platform=platform, budget=budget, session_started_at=session_started_at, clock=clock
    )
    lead = None if stop_lead is None else parse_duration(stop_lead, what="stop_lead")
    dog = NotebookWatchdog(
        store,
        info,
        refresh=parse_duration(refresh, what="refresh"),
        stop_lead=lead,
        clock=clock,
        display=display,
    )
    dog.display(f"colabjob: watching {store.url} ({info.describe(clock.time())})")
    return dog.start()


def _default_display() -> Callable[[str], None]:
    """Update one output line in IPython (Jupyter, Colab); print elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import Pretty, display
    except ImportError:
        return _print_line
    if get_ipython() is None:
        return _print_line
    handle: Any = None

    def show(line: str) -> None:
        nonlocal handle
        if handle is None:
            handle = display(Pretty(line), display_id=True)
        else:
            handle.update(Pretty(line))

    return show


def _print_line(line: str) -> None:
    print(line, flush=True)
