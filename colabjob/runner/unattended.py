"""What a segment that paused starts before ``colabjob`` exits, so no person has to.

``after_segment`` is called by ``start``/``resume`` once the segment's outcome is final (the
job record closed, the lease released): under SLURM it requeues the job
(``colabjob.runner.slurm``), inside a Kaggle kernel pushed with ``--chain`` it pushes the
next version (``colabjob.runner.handoff.kaggle_chain``). Each decides for itself whether the
pause is one a new session fixes; neither raises, so the exit code stays the segment's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from colabjob.errors import ExitCode
from colabjob.runner.handoff.kaggle_chain import continue_on_kaggle
from colabjob.runner.slurm import DEFAULT_MAX_REQUEUES, requeue_after_pause, requeue_decision

__all__ = ["after_segment"]


def after_segment(
    url: str,
    *,
    exit_code: int,
    stop_reason: str | None,
    signals: Sequence[str] = (),
    node_rank: int = 0,
    max_requeues: int = DEFAULT_MAX_REQUEUES,
    env: Mapping[str, str] | None = None,
    say: Callable[[str], None],
) -> None:
    environ = os.environ if env is None else env
    if environ.get("SLURM_JOB_ID"):
        decision = requeue_decision(
            environ,
            exit_code=exit_code,
            stop_reason=stop_reason,
            signals=signals,
            node_rank=node_rank,
            max_requeues=max_requeues,
        )
        if decision.argv is None and exit_code == ExitCode.PAUSED and node_rank == 0:
            say(f"colabjob: not requeued: {decision.why}")
        requeue_after_pause(decision, say=say)
    elif environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        continue_on_kaggle(
            url,
            exit_code=exit_code,
            stop_reason=stop_reason,
            node_rank=node_rank,
            env=environ,
            say=say,
        )
