"""The training child the CLI's supervisor starts: ``colabjob.runner.supervisor``'s child
protocol plus a progress display (``colabjob.display``) that the segment feeds directly
(``SegmentOptions.progress``): the metrics of every log interval with the session's
deadline and next checkpoint, and one line per event."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from colabjob.runner.child_protocol import RunRequest, child_main, run_in_process


def run_with_display(request: RunRequest, _progress: Any = None) -> Any:
    from colabjob.display import make_progress
    from colabjob.jobs.progress import close_progress

    sink = make_progress(request.progress, stream=sys.stdout)
    try:
        return run_in_process(request, sink)
    finally:
        close_progress(sink)


def main(argv: Sequence[str] | None = None) -> int:
    from colabjob.cli import quiet_warnings

    quiet_warnings()  # a quarantine is reported once, by its log line
    args = list(sys.argv[1:] if argv is None else argv)
    return child_main(args, runner=run_with_display)


if __name__ == "__main__":
    sys.exit(main())
