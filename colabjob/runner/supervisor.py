"""Runs a training segment in a child process and retries it when it crashes.

``supervise(request)`` starts ``python -m colabjob.runner.child_protocol child REQUEST RESULT``
(or another child module, e.g. the CLI's, which adds a progress display) in its own process
group, forwards SIGTERM/SIGINT/SIGUSR1 to it (so the child's watchdog checkpoints and
stops at the next step boundary: exit 75), and waits. The child writes a small JSON result
before it exits (with ``request.nproc`` > 1 or ``request.nnodes`` > 1 the child is
``colabjob.runner.launch``, which runs this node's ranks of it and reports as one). On a
node other than 0 (``request.node_rank`` > 0) the supervisor never writes ``job.json`` or
touches the lease: global rank 0, on node 0, holds both; a crash there is retried in step
with node 0's supervisor, whose retry waits at the same rendezvous. A child that dies without one
(SIGKILL, segfault, the OOM killer) or whose result says the error is retryable (an
exception in training, CUDA OOM, storage trouble) is a crash: its open segment is closed
in ``job.json`` with stop reason ``crash`` and the error, the dead child's lease is
released, and after a backoff the segment runs again from the last committed checkpoint,
up to ``retries`` times; then the job is FAILED. A user error (bad config, an import error,
a lease held elsewhere) fails at once. Exit codes: 0 done, 75 paused (resume in the next
session), 1 failed, 2 usage/config/lease error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import ColabJobError, ExitCode, ObjectNotFoundError, StorageError
from colabjob.jobs.policy import StopReason
from colabjob.runner.child_protocol import (
    ChildResult,
    RunRequest,
    classify_error,
    exit_code_for,
    run_in_process,
)
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import read_lease
from colabjob.runner.record import JobRecord, read_record, update_record
from colabjob.runner.signals import ForwardedSignals, as_child_signal
from colabjob.runner.states import JobEvent, JobState

if TYPE_CHECKING:
    from colabjob.storage.store import Store

__all__ = [
    "ChildResult",
    "RunRequest",
    "Supervisor",
    "SupervisorResult",
    "classify_error",
    "exit_code_for",
    "run_in_process",
    "supervise",
]

DEFAULT_RETRIES = 2
DEFAULT_BACKOFF = 5.0  # seconds before the first retry; doubles each time


@dataclass(frozen=True, kw_only=True)
class SupervisorResult:
    exit_code: int
    attempts: int
    last: ChildResult | None
    crashes: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()  # the stop signals this supervisor received, first first


# -- the supervisor ---------------------------------------------------------------------
def _signal_text(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the training process was killed by {name}"
    return f"the training process exited with status {returncode} without a result"


class Supervisor:
    """Runs a ``RunRequest`` in child processes until it completes, pauses or fails."""

    def __init__(
        self,
        request: RunRequest,
        *,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        child_module: str = "colabjob.runner.child_protocol",
        python: str = sys.executable,
        clock: Clock = SYSTEM_CLOCK,
        say: Callable[[str], None] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.request, self.retries, self.backoff = request, retries, float(backoff)
        self.child_module, self.python, self.clock = child_module, python, clock
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.env = env
        self.stopping = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._signals = ForwardedSignals(self._forward)
        self._pids: set[int] = set()
        self._received: list[str] = []

    # -- signals --------------------------------------------------------------------------------
    def _forward(self, signum: int, frame: object) -> None:
        self.stopping.set()
        self._received.append(signal.Signals(signum).name)  # which one: SLURM's requeue asks
        child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, as_child_signal(signum))

    # -- one attempt ----------------------------------------------------------------------------
    def _attempt(self, workdir: Path, attempt: int) -> tuple[ChildResult | None, int]:
        req_path = workdir / f"request-{attempt}.json"
        res_path = workdir / f"result-{attempt}.json"
        request = self.request if attempt == 0 else self.request.for_retry()
        req_path.write_text(request.to_json())
        cmd = [self.python, "-m", self.child_module, "child", str(req_path), str(res_path)]
        launch = self.request.launch_args()
        if launch:  # N ranks (on this node), one result (colabjob.runner.launch)
            launch = ["-m", "colabjob.runner.launch", *launch]
            cmd = [self.python, *launch, "--module", self.child_module, *cmd[3:]]
        env = dict(os.environ if self.env is None else self.env)
        self._child = subprocess.Popen(cmd, env=env, start_new_session=True)
        self._pids.add(self._child.pid)
        try:
            returncode = self._child.wait()
        finally:
            child, self._child = self._child, None
            if child.poll() is None:  # only on an exception in wait(): do not orphan it
                child.kill()
                child.wait()
        if res_path.exists():
            try:
                return ChildResult.from_json(res_path.read_text()), returncode
            except (ValueError, TypeError):
                pass
        return None, returncode

    def run(self) -> SupervisorResult:
        result = self._run()
        return dataclasses.replace(result, signals=tuple(self._received))

    def _run(self) -> SupervisorResult:
        crashes: list[str] = []
        self._signals.install()
        try:
            with tempfile.TemporaryDirectory(prefix="colabjob-supervisor-") as tmp:
                attempt = 0
                while True:
                    result, returncode = self._attempt(Path(tmp), attempt)
                    attempt += 1
                    done = SupervisorResult  # shorthand below
                    if result is not None and not result.retryable:
                        if result.error_type == "KeyboardInterrupt":  # make sure: SUSPENDED
                            self._record_crash(result.error or "", retry=True, interrupted=True)
                        code = self._final_code(result.exit_code)
                        return done(
                            exit_code=code, attempts=attempt, last=result, crashes=tuple(crashes)
                        )
                    error = (result.error if result else None) or _signal_text(returncode)
                    crashes.append(error)
                    if self.stopping.is_set():
                        # Told to stop (e.g. SIGTERM while the child was still starting):
                        # leave the job resumable from its last checkpoint.
                        self._record_crash(error, retry=True)
                        self.say(f"colabjob: stopped ({error}); resume to continue")
                        return done(
                            exit_code=ExitCode.PAUSED,
                            attempts=attempt,
                            last=result,
                            crashes=tuple(crashes),
                        )
                    retry = attempt <= self.retries
                    self._record_crash(error, retry=retry)
                    if not retry:
                        self.say(f"colabjob: segment crashed ({error}); no retries left")
                        return done(
                            exit_code=ExitCode.FAILED,
                            attempts=attempt,
                            last=result,
                            crashes=tuple(crashes),
                        )
                    wait = self.backoff * 2 ** (attempt - 1)
                    self.say(
                        f"colabjob: segment crashed ({error}); retry {attempt}/{self.retries} "
                        f"from the last checkpoint in {wait:.0f}s"
                    )
                    if wait > 0 and self.stopping.wait(wait):
                        return done(
                            exit_code=ExitCode.PAUSED,
                            attempts=attempt,
                            last=result,
                            crashes=tuple(crashes),
                        )
        finally:
            self._signals.restore()

    def _final_code(self, code: int) -> int:
        """A segment stopped by ``colabjob stop --cancel`` leaves nothing to resume: 0."""
        if code != ExitCode.PAUSED:
            return code
        from colabjob.storage.store import open_store

        try:
            got = read_record(open_store(self.request.url))
        except (ColabJobError, OSError):
            return code
        return ExitCode.DONE if got is not None and got[0].state is JobState.CANCELLED else code

    # -- the record after a crash -----------------------------------------------------------------
    def _record_crash(self, error: str, *, retry: bool, interrupted: bool = False) -> None:
        """Close the dead child's segment as a crash, free its lease, set the job's state:
        SUSPENDED when it will run again (or can be resumed), FAILED when retries ran out.
        ``interrupted``: a second Ctrl-C ended the child (stop reason ``signal``; usually
        the child closed its segment itself and nothing changes)."""
        from colabjob.storage.store import open_store

        if self.request.node_rank > 0:  # node 0's supervisor holds the lease and the record
            return
        try:
            store = open_store(self.request.url)
            self._release_dead_lease(store)
            if read_record(store) is None:
                return
            now = self.clock.time()
            step = _heartbeat_step(store)
            reason = StopReason.SIGNAL if interrupted else StopReason.CRASH

            def change(record: JobRecord) -> JobRecord:
                if record.current_segment is not None:
                    record = record.end_segment(
                        ended_at=now, last_step=step, stop_reason=reason, error=error
                    )
                if record.state is JobState.RUNNING:
                    record = record.apply(JobEvent.EXPIRE if retry else JobEvent.FAIL)
                elif record.state is JobState.SUSPENDED and not retry:
                    record = record.apply(JobEvent.RESUME).apply(JobEvent.FAIL)
                if interrupted:
                    return record
                crashes = int(record.extras.get("crashes", 0)) + 1
                return record.with_extras(crashes=crashes, last_crash=error)

            update_record(store, change, clock=self.clock)
        except (ColabJobError, OSError) as e:
            self.say(f"colabjob: could not record the crash in job.json ({e})")

    def _release_dead_lease(self, store: Store) -> None:
        """Release the lease our dead child left behind (this host; our session or its pid),
        so the retry (or a later resume) need not wait for it to expire."""
        import socket

        got = read_lease(store)
        if got is None or got[0].released:
            return
        holder = got[0].holder
        ours = holder.session_id == self.request.session_id or holder.pid in self._pids
        if holder.host != socket.gethostname() or not ours:
            return
        lease = Lease(store, holder=holder, clock=self.clock)
        lease.acquire()  # our own session's: taken at once, epoch bumped
        lease.release()


def _heartbeat_step(store: Store) -> int | None:
    try:
        got = read_lease(store)
    except (StorageError, ObjectNotFoundError):
        return None
    step = got[0].status.get("step") if got else None
    return int(step) if isinstance(step, int) else None


def supervise(request: RunRequest, **kwargs: Any) -> SupervisorResult:
    """Run ``request`` under a ``Supervisor`` (see its arguments)."""
    return Supervisor(request, **kwargs).run()
