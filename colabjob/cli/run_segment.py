"""Running a ``start``/``resume`` request: the ``RunRequest`` built from the parsed flags,
its segment run under the supervisor (or in this process for ``memory://``, which other
processes cannot see), and what is said when it ends: done, paused (or interrupted twice,
with the newest committed step), failed (the notification endpoints are told), followed by
what a pause starts before exiting (SLURM requeue, Kaggle chain).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from colabjob.cli.common import note
from colabjob.errors import ColabJobError, ExitCode

if TYPE_CHECKING:
    from colabjob.runner.supervisor import RunRequest, SupervisorResult
    from colabjob.runner.topology import NodeTopology


def build_request(
    args: argparse.Namespace,
    url: str,
    spec: dict[str, Any],
    *,
    nproc: int,
    topo: NodeTopology,
    force: bool = False,
) -> RunRequest:
    from colabjob.runner.supervisor import RunRequest

    return RunRequest(
        nnodes=topo.nnodes,
        node_rank=topo.node_rank,
        master_addr=topo.master_addr,
        master_port=topo.master_port,
        url=url,
        spec=spec,
        budget=args.budget,
        platform=args.platform,
        session_started_at=args.session_started_at,
        margin=args.margin,
        allow_geometry_change=args.allow_geometry_change,
        progress=args.progress,
        debug=bool(getattr(args, "debug", False)),
        force=force,
        nproc=nproc,
        from_step=getattr(args, "from_step", None),
        from_checkpoint=getattr(args, "checkpoint", None),
        from_scratch=bool(getattr(args, "from_scratch", False)),
    )


def run_request(request: RunRequest, args: argparse.Namespace) -> int:
    """Run the segment under the supervisor (in-process for memory://) and report."""
    from colabjob.runner.supervisor import ChildResult, SupervisorResult, supervise

    if request.url.startswith("memory://"):  # other processes cannot see it
        result = _in_process(request)
    else:
        result = supervise(
            request,
            retries=args.retries,
            backoff=args.retry_backoff,
            child_module="colabjob.cli.train_child",
        )
    last: ChildResult | None = result.last
    if last is not None and last.error and last.exit_code in (ExitCode.USAGE, ExitCode.FAILED):
        hint = f"\n  hint: {last.hint}" if last.hint else ""
        note(f"colabjob: error: {last.error}{hint}")
    _report(request.url, result)
    if result.exit_code == ExitCode.FAILED and request.node_rank == 0:
        _notify_failure(request.url, result)
    if isinstance(result, SupervisorResult) and not request.url.startswith("memory://"):
        from colabjob.runner.unattended import after_segment  # SLURM requeue, Kaggle chain

        after_segment(
            request.url,
            exit_code=result.exit_code,
            stop_reason=last.stop_reason if last is not None else None,
            signals=result.signals,
            node_rank=request.node_rank,
            max_requeues=getattr(args, "max_requeues", 0),
            say=note,
        )
    return result.exit_code if isinstance(result, SupervisorResult) else ExitCode.FAILED


def _notify_failure(url: str, result: SupervisorResult) -> None:
    """The job failed for good (retries spent, or a final error): tell the endpoints."""
    from colabjob.runner.notify import notify_urls
    from colabjob.runner.notify_events import notify_failure

    last = result.last
    error = (last.error if last is not None else None) or "; ".join(result.crashes[-1:])
    notify_failure(url, error or "the training process failed", notify_urls())


def _in_process(request: RunRequest) -> SupervisorResult:
    from colabjob.display import make_progress
    from colabjob.jobs.progress import close_progress
    from colabjob.runner.child_protocol import result_of
    from colabjob.runner.supervisor import SupervisorResult, classify_error, run_in_process

    progress = make_progress(request.progress)
    try:
        result = result_of(run_in_process(request, progress))
    except Exception as e:
        result = classify_error(e)
    finally:
        close_progress(progress)
    return SupervisorResult(exit_code=result.exit_code, attempts=1, last=result)


def _report(url: str, result: SupervisorResult) -> None:
    last = result.last
    step = f" at step {last.last_step}" if last is not None and last.last_step is not None else ""
    if result.exit_code == ExitCode.DONE:
        note(f"colabjob: done{step}. Status: colabjob status {url}")
    elif result.exit_code == ExitCode.PAUSED and last is not None and last.error_type == (
        "KeyboardInterrupt"
    ):
        note(_interrupted(url, last.error or "interrupted twice"))
    elif result.exit_code == ExitCode.PAUSED:
        why = f" ({last.stop_reason})" if last is not None and last.stop_reason else ""
        note(f"colabjob: paused{step}{why}. In the next session: colabjob resume {url}")
    elif result.exit_code == ExitCode.FAILED:
        note(f"colabjob: failed{step}; fix the cause, then: colabjob resume {url}")


def _interrupted(url: str, what: str) -> str:
    """What a second Ctrl-C left: the record's state and the newest committed step."""
    from colabjob.runner.record import read_record
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.store import open_store

    try:
        store = open_store(url)
        got = read_record(store)
        info = CheckpointStore(store).latest()
    except (ColabJobError, OSError) as e:
        return f"colabjob: {what} ({e}); `colabjob status {url}` shows where the job stands"
    state = got[0].state.value.upper() if got is not None else "unknown"
    at = f"step {info.step} (its last commit)" if info is not None else "step 0 (no commit yet)"
    return f"colabjob: {what}; the job is {state} at {at}; resume with `colabjob resume {url}`"
