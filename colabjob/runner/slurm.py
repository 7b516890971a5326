"""Putting a paused SLURM job back in the queue: ``scontrol requeue $SLURM_JOB_ID``.

A batch script of one line, ``srun colabjob resume URL``, with ``#SBATCH --requeue
--signal=USR1@120``, then runs a job to its end without a person: SLURM sends SIGUSR1 two
minutes before the wall time, the segment commits and pauses (exit 75), and just before
``colabjob`` exits ``requeue_after_pause`` asks SLURM to queue the same job again; the next
allocation runs the same script, which resumes from the newest commit.

It requeues only what a new allocation fixes: a budget stop (the projected end in
``SLURM_JOB_END_TIME`` is near) or SIGUSR1 (``--signal``). Not SIGTERM: that is what
``scancel`` and SLURM's own preemption send (a preempted job that may be requeued is
requeued by SLURM; a cancelled one must stay cancelled), nor a stop request, a second Ctrl-C,
a completion or a failure. Only the process with ``SLURM_PROCID`` 0 on node 0 asks: one
requeue for the whole job, however many nodes. The count of earlier requeues is
``SLURM_RESTART_COUNT``, which SLURM itself sets (and keeps) on every requeue of the job,
so no state of ours can drift from it; at ``max_requeues`` (``--max-requeues``, default 20)
it stops asking, so a job that pauses without progress cannot loop forever.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from colabjob.errors import ExitCode
from colabjob.jobs.policy import StopReason

__all__ = [
    "DEFAULT_MAX_REQUEUES",
    "Requeue",
    "add_requeue_flags",
    "requeue_after_pause",
    "requeue_decision",
]

DEFAULT_MAX_REQUEUES = 20
SCONTROL_TIMEOUT_S = 60.0

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True, kw_only=True)
class Requeue:
    """What to do after a segment: ``argv`` to run (None: nothing) and why, in words."""

    argv: tuple[str, ...] | None
    why: str


def add_requeue_flags(p: argparse.ArgumentParser) -> None:
    """``--max-requeues N`` (start and resume)."""
    p.add_argument(
        "--max-requeues",
        type=int,
        default=DEFAULT_MAX_REQUEUES,
        metavar="N",
        help="under SLURM, requeue this job (scontrol requeue) after a wall-time pause at "
        f"most N times, counted by SLURM_RESTART_COUNT (default {DEFAULT_MAX_REQUEUES}; 0: "
        "never)",
    )


def _restart_count(env: Mapping[str, str]) -> int:
    try:
        return max(0, int(env.get("SLURM_RESTART_COUNT", "0") or 0))
    except ValueError:
        return 0


def requeue_decision(
    env: Mapping[str, str],
    *,
    exit_code: int,
    stop_reason: str | None,
    signals: Sequence[str] = (),
    node_rank: int = 0,
    max_requeues: int = DEFAULT_MAX_REQUEUES,
    scontrol: str = "scontrol",
) -> Requeue:
    """Whether this process should requeue its SLURM job after a segment that ended with
    ``exit_code`` for ``stop_reason``, having received ``signals`` (names, first first)."""
    job_id = env.get("SLURM_JOB_ID", "")
    if not job_id:
        return Requeue(argv=None, why="not a SLURM job")
    if exit_code != ExitCode.PAUSED:
        return Requeue(argv=None, why="the segment did not pause")
    if node_rank != 0 or env.get("SLURM_PROCID", "0") not in ("", "0"):
        return Requeue(argv=None, why="only SLURM_PROCID 0 on node 0 requeues")
    by_signal = stop_reason == StopReason.SIGNAL.value and signals[:1] == ("SIGUSR1",)
    if stop_reason != StopReason.BUDGET.value and not by_signal:
        what = f"{stop_reason} ({signals[0]})" if signals else str(stop_reason)
        return Requeue(argv=None, why=f"the pause ({what}) is not the wall time's")
    done = _restart_count(env)
    if done >= max_requeues:
        return Requeue(
            argv=None,
            why=f"requeued {done} times already (--max-requeues {max_requeues})",
        )
    return Requeue(
        argv=(scontrol, "requeue", job_id),
        why=f"requeue {done + 1} of at most {max_requeues}",
    )


def requeue_after_pause(
    decision: Requeue,
    *,
    say: Callable[[str], None],
    runner: Runner = subprocess.run,
) -> bool:
    """Run the decided ``scontrol requeue``; True when SLURM accepted it. A failure is told
    (with what to do) and returns False: the job stays paused and resumable by hand."""
    if decision.argv is None:
        return False
    job_id = decision.argv[-1]
    path = shutil.which(decision.argv[0])
    if path is None:
        say(f"colabjob: could not requeue SLURM job {job_id}: {decision.argv[0]} not on PATH")
        return False
    try:
        done = runner(
            [path, *decision.argv[1:]], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        say(f"colabjob: could not requeue SLURM job {job_id}: {e}")
        return False
    if done.returncode != 0:
        why = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no output"]
        say(
            f"colabjob: `scontrol requeue {job_id}` failed (exit {done.returncode}): {why[0]}; "
            "submit the job with #SBATCH --requeue, or resubmit it by hand"
        )
        return False
    say(f"colabjob: requeued SLURM job {job_id} ({decision.why}); it resumes when it runs again")
    return True
