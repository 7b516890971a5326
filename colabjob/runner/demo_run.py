"""The embedded demo (``colabjob.jobs.demo``) run through the runner, as ``colabjob demo`` does.

Each simulated session is a real segment (``run_segment``): the job record and its history,
the lease, the watchdog, checkpoints under ``<root>/job`` and TensorBoard files, so
``colabjob status``/``plot``/``logs`` work on the demo job afterwards. A session ends the
way a real one does, by the runner's stop machinery: the demo's step count
(``jobs.demo.StepBudget``) is the watchdog's extra policy (``SegmentOptions.stop_policy``),
and the session stops with reason ``budget`` and a committed checkpoint. The uninterrupted
comparison run is a job of its own under ``<root>/straight``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from colabjob.runner.options import SegmentOptions
from colabjob.runner.segment import run_segment

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.context import SegmentOutcome
    from colabjob.jobs.demo import DemoReport, DemoSize
    from colabjob.jobs.policy import StopPolicy
    from colabjob.jobs.progress import ProgressSink

__all__ = ["run_demo", "runner_segment"]


def runner_segment(
    progress: ProgressSink | None = None,
) -> Callable[..., SegmentOutcome]:
    """A ``segment`` for ``jobs.demo.run_demo``: one runner segment per simulated session,
    its metrics and events to ``progress`` (the comparison run's to nobody)."""

    def segment(
        url: Path, spec: JobSpec, policy: StopPolicy, *, verbose: bool = True
    ) -> SegmentOutcome:
        options = SegmentOptions(
            platform="local",
            stop_policy=policy,
            progress=progress if verbose else None,
            log=None,
        )
        return run_segment(str(url), spec, options=options)

    return segment


def run_demo(
    root: str | Path,
    *,
    size: str | DemoSize = "default",
    sessions: int = 3,
    compare: bool = True,
    progress: ProgressSink | None = None,
) -> DemoReport:
    """``jobs.demo.run_demo`` with every session a runner segment; its own lines (session
    summaries, the verdict) go to ``progress.event``."""
    from colabjob.jobs import demo

    return demo.run_demo(
        root,
        size=size,
        sessions=sessions,
        compare=compare,
        log=progress.event if progress is not None else None,
        segment=runner_segment(progress),
    )
