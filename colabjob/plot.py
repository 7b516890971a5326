"""``colabjob plot``: the loss (and learning rate) of a job against its step, across sessions.

One PNG (matplotlib's Agg backend, imported only here and only when plotting): the loss
curve from the committed metrics history, the learning rate on a second axis when it was
logged, a dashed vertical line where each new segment (session) began, labelled with why
the segment before it stopped (budget, signal, preemption, crash, ...), and the last
segment's stop reason at its end. ``plot_history`` returns what it drew, so callers (and
tests) can count the session markers from the data, not from pixels.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from colabjob.errors import ConfigError

if TYPE_CHECKING:
    from colabjob.runner.history import JobHistory
    from colabjob.storage.store import Store


@dataclass(frozen=True, kw_only=True)
class Boundary:
    """A session boundary: the step a segment started from and why the previous one stopped."""

    step: int
    stop_reason: str
    segment: int  # index (in the record's history) of the segment that starts here


@dataclass(frozen=True, kw_only=True)
class PlotResult:
    path: Path
    points: int  # loss points drawn
    lr_points: int
    boundaries: tuple[Boundary, ...]
    final_reason: str | None  # stop reason of the last segment (None while it runs)


def boundaries_of(history: JobHistory) -> tuple[tuple[Boundary, ...], str | None]:
    """One boundary per segment after the first; and the last segment's stop reason."""
    segs = history.segments
    marks = tuple(
        Boundary(
            step=seg.first_step,
            stop_reason=(prev.stop_reason.value if prev.stop_reason else "unknown"),
            segment=i,
        )
        for i, (prev, seg) in enumerate(itertools.pairwise(segs), start=1)
    )
    last = segs[-1].stop_reason if segs else None
    return marks, (last.value if last else None)


def plot_history(
    history: JobHistory, out: str | os.PathLike[str], *, title: str | None = None
) -> PlotResult:
    """Draw ``history`` into the PNG ``out``; ConfigError if nothing was logged yet."""
    steps, losses = history.series("loss")
    lr_steps, lrs = history.series("lr")
    if not steps:
        raise ConfigError(
            f"job {history.record.job_id} has no committed loss values yet",
            hint="metrics are committed with checkpoints; plot again after the first checkpoint",
        )
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    marks, final = boundaries_of(history)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    try:
        ax.plot(steps, losses, color="tab:blue", linewidth=1.2, label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss", color="tab:blue")
        ax.grid(alpha=0.3)
        if lrs:
            ax2 = ax.twinx()
            ax2.plot(lr_steps, lrs, color="tab:orange", linewidth=1.0, alpha=0.8, label="lr")
            ax2.set_ylabel("learning rate", color="tab:orange")
        top = ax.get_ylim()[1]
        for mark in marks:
            ax.axvline(mark.step, color="grey", linestyle="--", linewidth=0.9)
            ax.annotate(
                mark.stop_reason,
                (mark.step, top),
                xytext=(-3, -4),
                textcoords="offset points",
                rotation=90,
                ha="right",
                va="top",
                fontsize=8,
                color="dimgrey",
            )
        if final is not None:
            ax.annotate(
                final,
                (steps[-1], losses[-1]),
                xytext=(0, 8),
                textcoords="offset points",
                ha="right",
                fontsize=8,
                color="dimgrey",
            )
        sessions = len(history.segments)
        ax.set_title(title or f"{history.record.job_id}: {sessions} segment{'s' * (sessions != 1)}")
        fig.tight_layout()
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return PlotResult(
        path=path,
        points=len(steps),
        lr_points=len(lrs),
        boundaries=marks,
        final_reason=final,
    )


def plot_job(store: Store, out: str | os.PathLike[str]) -> PlotResult:
    """Load a job's committed history from ``store`` and plot it to ``out``."""
    from colabjob.runner.history import load_history

    return plot_history(load_history(store), out)
