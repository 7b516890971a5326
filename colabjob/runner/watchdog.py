"""Every reason to stop, folded into one ``threading.Event`` read at step boundaries.

Sources: the predictive deadline (a ``budget`` policy, evaluated in ``should_stop``),
SIGTERM/SIGINT/SIGUSR1 (handlers only record the signal and set the event — no I/O, no
locks of ours), a GCE preemption notice (a daemon thread long-polling the metadata server),
and a stop request in the job's storage (``control/stop.json``, written by
``colabjob.runner.stop_request.request_stop`` from any machine). On local disk, Drive and
memory storage the request is looked for at step boundaries, at most once per
``stop_check_seconds`` (1 s) of the injected clock: one ``stat`` of the file
(microseconds), read only when it changed; so ``colabjob stop`` takes effect within about
a second plus one step. Every store, GCS included, is also polled by a daemon thread every
``stop_poll_seconds`` (10 s: one GET; it also covers steps longer than that). The first
reason wins; a preemption notice also raises ``emergency`` so the saver writes the
smallest exact checkpoint. ``Watchdog`` satisfies ``colabjob.jobs.policy.StopPolicy``.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import StorageError
from colabjob.jobs.policy import AnyOf, NeverStop, StopPolicy, StopReason
from colabjob.runner.budget import DEFAULT_MARGIN, budget_for
from colabjob.runner.platforms import PlatformInfo, metadata_get
from colabjob.runner.signals import forget_completion, keep_going_after_completion
from colabjob.runner.stop_request import read_stop_request, stop_probe

if TYPE_CHECKING:
    from colabjob.storage.store import Store

log = logging.getLogger(__name__)

STOP_POLL_SECONDS = 10.0  # the daemon thread's poll (GCS: a GET each time)
STOP_CHECK_SECONDS = 1.0  # the step-boundary check on file and memory storage
DEFAULT_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")


class Watchdog(StopPolicy):
    """The one stop event, its reason, and the threads and handlers that set it."""

    def __init__(
        self,
        policy: StopPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        store: Store | None = None,
        epoch: int | Callable[[], int] | None = None,
        stop_poll_seconds: float = STOP_POLL_SECONDS,
        stop_check_seconds: float = STOP_CHECK_SECONDS,
        signals: Iterable[str | int] = DEFAULT_SIGNALS,
        preemption: bool = False,
        environ: Mapping[str, str] | None = None,
        preemption_wait_seconds: float = 60.0,
    ) -> None:
        self.policy: StopPolicy = NeverStop() if policy is None else policy
        self.clock, self.store = clock, store
        # The per-step calls go straight to the policy: no forwarding frame on the hot path
        # (the Session calls them at every step boundary).
        self.observe_step = self.policy.observe_step  # type: ignore[method-assign]
        self.checkpoint_due = self.policy.checkpoint_due  # type: ignore[method-assign]
        self.stop_poll_seconds = float(stop_poll_seconds)
        self.stop_check_seconds = float(stop_check_seconds)
        self._probe: Callable[[], object] | None = None  # set by start() for cheap stores
        self._next_check = float("-inf")
        self._probed: object = None  # what the probe saw when the request was last read
        self.signals = [n for n in (_signum(s) for s in signals) if n is not None]
        self.preemption = preemption
        self.environ = environ
        self.preemption_wait_seconds = preemption_wait_seconds
        self.event = threading.Event()
        self.cancel_requested = False
        self.signals_installed = False
        self._epoch = epoch
        self._fired: list[tuple[StopReason, str]] = []  # appended by handlers: no lock
        self._signums: list[int] = []
        self._previous: dict[int, Any] = {}
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ignored_request: str | None = None

    # -- the stop decision -------------------------------------------------------------------
    @property
    def reason(self) -> StopReason | None:
        """The first reason to stop that arrived, or None."""
        return self._fired[0][0] if self._fired else None

    @property
    def detail(self) -> str:
        """Words about why (e.g. ``received SIGTERM``)."""
        if not self._fired:
            return ""
        reason, detail = self._fired[0]
        if reason is StopReason.SIGNAL and self._signums:
            return f"received {_signame(self._signums[0])}"
        return detail

    @property
    def emergency(self) -> bool:
        """A preemption notice arrived: save the smallest exact checkpoint now."""
        if self._fired and any(r is StopReason.PREEMPTION for r, _ in self._fired):
            return True  # (asked at every step boundary: no generator unless something fired)
        return self.policy.emergency

    def trigger(self, reason: StopReason | str, detail: str = "") -> None:
        """Record a reason to stop and set the event (safe from any thread)."""
        self._fired.append((StopReason(reason), detail))
        self.event.set()

    def lease_lost(self, message: str) -> None:
        """``Heartbeat(on_lost=...)`` target: another runner owns the job now."""
        self.trigger(StopReason.STOP_REQUEST, message)

    # -- StopPolicy ---------------------------------------------------------------------------
    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        self.policy.observe_checkpoint(
            write_seconds=write_seconds, upload_seconds=upload_seconds, nbytes=nbytes
        )

    def expect_checkpoint(self, nbytes: int) -> None:
        self.policy.expect_checkpoint(nbytes)

    def should_stop(self) -> StopReason | None:
        if self._probe is not None and not self.event.is_set():
            self._check_at_boundary()
        if not self.event.is_set():
            verdict = self.policy.should_stop()
            if verdict is not None:
                self.trigger(
                    verdict,
                    "the next step and a final save would cross the deadline"
                    if verdict == StopReason.BUDGET
                    else "",
                )
        return self.reason if self.event.is_set() else None

    def status(self) -> dict[str, Any]:
        status = dict(self.policy.status())
        reason = self.reason
        status["stop_reason"] = reason.value if reason else None
        return status

    # -- signals ----------------------------------------------------------------------------
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # No I/O, no logging: record the signal and set the event. A second Ctrl-C aborts.
        if signum == signal.SIGINT and signal.SIGINT in self._signums:
            raise KeyboardInterrupt
        self._signums.append(signum)
        self._fired.append((StopReason.SIGNAL, ""))
        self.event.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("watchdog started outside the main thread: signal handlers not installed")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handler)
        self.signals_installed = bool(self.signals)

    def _restore_signals(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.signals_installed = False

    # -- stop requests ------------------------------------------------------------------------
    def _own_epoch(self) -> int | None:
        return self._epoch() if callable(self._epoch) else self._epoch

    def check_stop_request(self) -> bool:
        """Poll ``control/stop.json`` once; True (and the event set) if it asks us to stop."""
        if self.store is None:
            return False
        try:
            request = read_stop_request(self.store)
        except (StorageError, OSError) as e:
            log.debug("stop-request poll failed (will retry): %s", e)
            return False
        if request is None or request.id == self._ignored_request:
            return False
        epoch = self._own_epoch()
        if epoch is not None and request.epoch < epoch:
            return False  # meant for an earlier runner of this job
        if request.cancel:
            self.cancel_requested = True
        detail = f"requested by {request.requested_by}" + (
            f": {request.reason}" if request.reason else ""
        )
        self.trigger(StopReason.STOP_REQUEST, detail)
        return True

    def _check_at_boundary(self) -> None:
        """The rate-limited look for a stop request at a step boundary (cheap stores)."""
        now = self.clock.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.stop_check_seconds
        assert self._probe is not None
        try:
            seen = self._probe()
        except OSError as e:  # Drive's FUSE mount can drop; the poller thread still runs
            log.debug("stop-request check failed (will retry): %s", e)
            return
        if seen is None or seen == self._probed:
            return  # no request, or the one already read (and ignored)
        self._probed = seen
        self.check_stop_request()

    def _poll_stop_requests(self) -> None:
        while not self._closing.wait(self.stop_poll_seconds):
            if self.check_stop_request():
                return

    # -- GCE preemption -----------------------------------------------------------------------
    def _watch_preemption(self) -> None:
        etag: str | None = None
        backoff = 0.5
        while not self._closing.is_set():
            params: dict[str, str] = {}
            if etag is not None:
                params = {
                    "wait_for_change": "true",
                    "last_etag": etag,
                    "timeout_sec": str(int(self.preemption_wait_seconds)),
                }
            try:
                body, etag = metadata_get(
                    "instance/preempted",
                    environ=self.environ,
                    params=params,
                    timeout=self.preemption_wait_seconds + 10,
                )
                etag = etag or ""
                backoff = 0.5
            except OSError as e:
                log.debug("preemption poll failed (will retry): %s", e)
                self._closing.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if body.strip().upper() == "TRUE":
                self.trigger(StopReason.PREEMPTION, "GCE preemption notice (about 30 s left)")
                return

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Watchdog:
        """Install the signal handlers (main thread only) and start the poller threads."""
        self._install_signals()
        if self.store is not None:
            if self._epoch is None:  # no epoch to scope requests: ignore one left from before
                old = read_stop_request(self.store)
                self._ignored_request = old.id if old else None
            self._probe = stop_probe(self.store)
            self._spawn(self._poll_stop_requests, "colabjob-stop-request")
        if self.preemption:
            self._spawn(self._watch_preemption, "colabjob-preemption")
        return self

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self, timeout: float = 2.0, *, completed: bool = False) -> None:
        """Restore the previous signal handlers and stop the threads (daemons; never hangs).

        ``completed``: the job is COMPLETED; a stop signal from now on is noted and survived
        instead of killing the process (``runner.signals.keep_going_after_completion``)."""
        self._closing.set()
        if self._previous:
            handled = list(self._previous)
            self._restore_signals()
            if completed:
                keep_going_after_completion(handled)
            else:
                forget_completion(handled)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        self._threads.clear()

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def watchdog_for(
    platform: PlatformInfo,
    *,
    store: Store | None = None,
    epoch: int | Callable[[], int] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    margin: float | str = DEFAULT_MARGIN,
    checkpoint_every: float | str | None = None,
    checkpoint_nbytes: int | None = None,
    step_guess: float | str | None = None,
    save_guess: float | str | None = None,
    stop_poll_seconds: float = STOP_POLL_SECONDS,
    environ: Mapping[str, str] | None = None,
    extra: StopPolicy | None = None,
) -> Watchdog:
    """A watchdog (not started) with the budget, signals and notices ``platform`` calls for.

    ``step_guess``/``save_guess``: see ``budget_for``. ``extra`` is one more policy whose
    stop counts like the budget's (e.g. a step count ending a simulated session)."""
    policy: StopPolicy = budget_for(
        platform,
        clock=clock,
        margin=margin,
        checkpoint_every=checkpoint_every,
        checkpoint_nbytes=checkpoint_nbytes,
        step_guess=step_guess,
        save_guess=save_guess,
    )
    if extra is not None:
        policy = AnyOf(policy, extra)
    return Watchdog(
        policy,
        clock=clock,
        store=store,
        epoch=epoch,
        stop_poll_seconds=stop_poll_seconds,
        preemption=platform.preemptible,
        environ=environ,
    )


def _signum(sig: str | int) -> int | None:
    if isinstance(sig, int):
        return sig
    value = getattr(signal, sig, None)  # SIGUSR1 does not exist on Windows
    return int(value) if value is not None else None


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
