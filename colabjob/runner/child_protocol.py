"""The child side of the supervisor protocol: ``child REQUEST_FILE RESULT_FILE``.

The supervisor (``colabjob.runner.supervisor``) writes a ``RunRequest`` (job URL, spec
snapshot, this session's overrides, a session id kept across retries) as JSON and starts
``python -m colabjob.runner.child_protocol child REQUEST RESULT``. The child runs one segment
(``colabjob.runner.segment.run_segment``) and writes a ``ChildResult`` before it exits: how
the segment ended, or the error, its hint and whether a retry could help. A child whose
supervisor dies stops as if sent SIGTERM (checkpoint, exit 75), so none is orphaned mid-run.
A second Ctrl-C (SIGINT) aborts without the final checkpoint: the job is SUSPENDED at its
last commit, so that is reported as paused (75), not as a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.errors import (
    ColabJobError,
    ExitCode,
    JobStateError,
    NoCheckpointError,
    StaleEpochError,
    StorageError,
    TransientStorageError,
    UnsafeCheckpointError,
)
from colabjob.jobs.policy import StopReason
from colabjob.storage.selection import ResumeChoice

if TYPE_CHECKING:
    from colabjob.jobs.context import SegmentOutcome
    from colabjob.jobs.progress import ProgressSink

INTERRUPTED = "interrupted twice: stopped without a final checkpoint"
_USER_ERRORS = (ImportError, SyntaxError, NameError)  # a retry would fail the same way
# Retrying cannot help these either (a transient storage error is retried, though).
_FINAL_ERRORS = (JobStateError, NoCheckpointError, UnsafeCheckpointError, StorageError)


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """What one segment runs: the job URL, its spec snapshot and this session's overrides."""

    url: str
    spec: Mapping[str, Any]
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    budget: str | None = None
    platform: str | None = None
    session_started_at: str | None = None
    margin: str | None = None
    force: bool = False
    allow_geometry_change: bool = False
    progress: str = "auto"
    debug: bool = False
    nproc: int = 1  # > 1: the supervisor runs it through colabjob.runner.launch
    nnodes: int = 1  # > 1: so does it, with this node's place (colabjob.runner.topology)
    node_rank: int = 0  # > 0: a follower node: its supervisor writes nothing to the job
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    from_step: int | None = None  # resume --from-step / --checkpoint / --from-scratch
    from_checkpoint: str | None = None
    from_scratch: bool = False
    supervised: bool = False  # run by a supervisor's child: it tells of a final failure

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    def launch_args(self) -> list[str]:
        """``colabjob.runner.launch``'s flags for this node, or [] to run one process."""
        if self.nproc <= 1 and self.nnodes <= 1:
            return []
        args = ["--nproc", str(self.nproc), "--nnodes", str(self.nnodes)]
        args += ["--node-rank", str(self.node_rank), "--master-addr", self.master_addr]
        return args + ([] if self.master_port is None else ["--master-port", str(self.master_port)])

    def resume_choice(self) -> ResumeChoice | None:
        if self.from_step is None and self.from_checkpoint is None and not self.from_scratch:
            return None
        return ResumeChoice(
            step=self.from_step, checkpoint=self.from_checkpoint, scratch=self.from_scratch
        )

    def for_retry(self) -> RunRequest:
        """A retry after a crash resumes from the newest checkpoint: the choice of the first
        attempt was applied (newer checkpoints set aside, or all of them for a fresh start)."""
        return dataclasses.replace(
            self, from_step=None, from_checkpoint=None, from_scratch=False
        )

    @classmethod
    def from_json(cls, text: str) -> RunRequest:
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True, kw_only=True)
class ChildResult:
    """What a child reports: how the segment ended, or the error and whether to retry."""

    exit_code: int
    stop_reason: str | None = None
    first_step: int | None = None
    last_step: int | None = None
    checkpoint_step: int | None = None
    completed: bool = False
    error: str | None = None
    error_type: str | None = None
    hint: str | None = None
    retryable: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChildResult:
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -- outcome and error classification ----------------------------------------------------
def exit_code_for(outcome: SegmentOutcome) -> int:
    """0 when the job completed, 75 when it stopped in time to resume, 1 after a crash."""
    if outcome.completed:
        return ExitCode.DONE
    return ExitCode.FAILED if outcome.stop_reason == StopReason.CRASH.value else ExitCode.PAUSED


def result_of(outcome: SegmentOutcome) -> ChildResult:
    """The result a segment that returned reports: a crash it caught may be retried."""
    return ChildResult(
        exit_code=exit_code_for(outcome),
        stop_reason=outcome.stop_reason,
        first_step=outcome.first_step,
        last_step=outcome.last_step,
        checkpoint_step=outcome.checkpoint_step,
        completed=outcome.completed,
        error=outcome.error,
        retryable=outcome.stop_reason == StopReason.CRASH.value,
    )


def classify_error(exc: BaseException) -> ChildResult:
    """The result a child reports for an exception: user errors are not retried."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ColabJobError):
        usage = exc.exit_code == ExitCode.USAGE or isinstance(exc, StaleEpochError)
        final = isinstance(exc, _FINAL_ERRORS) and not isinstance(exc, TransientStorageError)
        return ChildResult(
            exit_code=ExitCode.USAGE if usage else ExitCode.FAILED,
            error=str(exc.args[0]) if exc.args else text,
            error_type=type(exc).__name__,
            hint=exc.hint,
            retryable=not (usage or final),
        )
    if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C: the job stays SUSPENDED
        return ChildResult(
            exit_code=ExitCode.PAUSED,
            stop_reason=StopReason.SIGNAL.value,
            error=INTERRUPTED,
            error_type="KeyboardInterrupt",
        )
    return ChildResult(
        exit_code=ExitCode.FAILED,
        error=f"{type(exc).__name__}: {text}",
        error_type=type(exc).__name__,
        retryable=not isinstance(exc, _USER_ERRORS),
    )


# -- the child -------------------------------------------------------------------------
def run_in_process(
    request: RunRequest,
    progress: ProgressSink | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> SegmentOutcome:
    """Run one segment here (no crash isolation); what the child process calls.

    ``progress`` receives the metrics every ``log_every_steps`` (with the session's deadline
    and next checkpoint) and the events (checkpoint commits, the stop); ``log``, when given,
    receives the events (and, without ``progress``, the metrics as lines).
    """
    from colabjob.config import JobSpec
    from colabjob.runner.segment import SegmentOptions, run_segment

    spec = JobSpec.from_dict(request.spec)
    options = SegmentOptions(
        budget=request.budget,
        platform=request.platform,
        session_started_at=request.session_started_at,
        margin=request.margin,
        force=request.force,
        allow_geometry_change=request.allow_geometry_change,
        session_id=request.session_id,
        resume=request.resume_choice(),
        supervised=request.supervised,
        log=log,
        progress=progress,
    )
    return run_segment(request.url, spec, options=options)


def _watch_parent(parent: int) -> None:
    """If the supervisor dies (SIGKILL), stop as if told to: checkpoint and exit."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="colabjob-parent-watch", daemon=True).start()


def child_main(
    argv: Sequence[str],
    *,
    runner: Callable[[RunRequest, ProgressSink | None], SegmentOutcome] = run_in_process,
) -> int:
    """``child REQUEST_FILE RESULT_FILE``: run the segment, write the result, exit.

    ``runner`` runs the request (the CLI passes one that adds a progress display)."""
    if len(argv) != 3 or argv[0] != "child":
        usage = "usage: python -m colabjob.runner.child_protocol child REQUEST RESULT"
        print(usage, file=sys.stderr)
        return ExitCode.USAGE
    request = dataclasses.replace(RunRequest.from_json(Path(argv[1]).read_text()), supervised=True)
    result_path = Path(argv[2])
    _watch_parent(os.getppid())
    try:
        result = result_of(runner(request, None))
    except BaseException as e:  # reported to the supervisor, which decides about retries
        if request.debug:
            import traceback

            traceback.print_exc()
        result = classify_error(e)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(result.to_json())
    os.replace(tmp, result_path)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    return child_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
