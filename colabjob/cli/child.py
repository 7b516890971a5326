"""The training child the CLI's supervisor starts: ``colabjob.runner.supervisor``'s child
protocol plus a progress display (``colabjob.display``) fed by the segment's log lines."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from colabjob.runner.child import RunRequest, child_main, run_in_process


def _deadline(request: RunRequest) -> float | None:
    """This session's end, as the segment will compute it (flags, else the spec's budget)."""
    from colabjob.errors import ColabJobError
    from colabjob.runner.platforms import describe_platform

    budget: Any = request.spec.get("budget") or {}
    platform = request.platform or budget.get("platform")
    try:
        return describe_platform(
            platform=None if platform in (None, "auto") else platform,
            budget=request.budget or budget.get("limit"),
            session_started_at=request.session_started_at or budget.get("session_started_at"),
        ).deadline
    except ColabJobError:
        return None


def run_with_display(request: RunRequest, _progress: Any = None) -> Any:
    from colabjob.display import LogBridge, make_progress
    from colabjob.jobs.progress import close_progress

    training: Any = request.spec.get("training") or {}
    total = training.get("max_steps")
    sink = make_progress(request.progress, stream=sys.stdout)
    bridge = LogBridge(
        sink, total=total if isinstance(total, int) else None, deadline=_deadline(request)
    )
    try:
        return run_in_process(request, sink, log=bridge)
    finally:
        close_progress(sink)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return child_main(args, runner=run_with_display)


if __name__ == "__main__":
    sys.exit(main())
