"""The plug point between a training loop and whoever shows its progress.

The jobs layer (``Session``, the kinds, the HF callback) calls a ``ProgressSink`` once per
optimizer step with the step, the total (None when unknown) and that step's metrics, and
once per notable event (segment start, checkpoint committed, stop, retry) with one line of
text. The CLI implements it (``colabjob.display``: a rich progress bar on a terminal, one
plain line per interval elsewhere) without the jobs layer importing rich. ``NullProgress``
is the default when nobody is watching. Implementations must be cheap (a step may take
milliseconds) and must never raise into the training loop.

Metric keys the display understands when present: ``loss``, ``lr``, ``samples`` (samples
seen so far; the display derives samples/s), ``deadline`` (wall-clock end of the session)
and ``next_checkpoint_at`` (wall-clock time of the next interval checkpoint) or
``next_checkpoint_step``. Anything else is shown as given. ``STATUS_KEYS`` are those that
describe the session rather than the training (a metrics logger leaves them out).

The segment calls ``update`` at its log interval (``log_every_steps``), not every step.
``LogLines`` turns updates into the plain ``step=120 loss=2.31 ...`` lines of a log
callable; ``FanOut`` sends to several sinks (a display, TensorBoard, W&B) and keeps a
failing one from reaching the training loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from colabjob.jobs.policy import StopPolicy

log = logging.getLogger(__name__)

#: Keys about the session, not the training: not metrics to plot.
STATUS_KEYS = frozenset({"deadline", "next_checkpoint_at", "next_checkpoint_step"})


@runtime_checkable
class ProgressSink(Protocol):
    """Receives per-step progress and one-line events from a training segment."""

    def update(self, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        """Optimizer step ``step`` (of ``total``) finished with ``metrics``."""
        ...

    def event(self, text: str) -> None:
        """Something worth a line happened (checkpoint committed, stop, retry, ...)."""
        ...


class NullProgress:
    """A sink that shows nothing."""

    def update(self, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        pass

    def event(self, text: str) -> None:
        pass


def close_progress(sink: object) -> None:
    """Call ``sink.close()`` when the sink has one (a live display must restore the terminal)."""
    close = getattr(sink, "close", None)
    if callable(close):
        close()


def format_metric_line(row: Mapping[str, Any]) -> str:
    """``step=120 epoch=0 samples=960 loss=2.31 lr=0.0006``: a metrics row as a log line."""
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
    )


class LogLines:
    """A sink that writes each update as one ``format_metric_line`` line (without the
    session keys) and each event as itself to ``log``."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def update(self, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if k not in STATUS_KEYS}}
        self.log(format_metric_line(row))

    def event(self, text: str) -> None:
        self.log(text)


class FanOut:
    """Every update and event to each of ``sinks``; one that raises is logged and skipped
    (a display or a logger must never stop training)."""

    def __init__(self, *sinks: ProgressSink) -> None:
        self.sinks = sinks

    def update(self, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            try:
                sink.update(step, total, metrics)
            except Exception as e:
                log.warning("progress sink %s failed: %s", type(sink).__name__, e)

    def event(self, text: str) -> None:
        for sink in self.sinks:
            try:
                sink.event(text)
            except Exception as e:
                log.warning("progress sink %s failed: %s", type(sink).__name__, e)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                close_progress(sink)
            except Exception as e:
                log.warning("closing progress sink %s failed: %s", type(sink).__name__, e)


def progress_row(
    entry: Mapping[str, Any], policy: StopPolicy, every_steps: int | None
) -> dict[str, Any]:
    """A metrics history entry as a ``ProgressSink`` row: without its step, plus the
    session's deadline and next checkpoint (from the stop policy's ``status()`` and the step
    interval)."""
    shown = {k: v for k, v in entry.items() if k != "step"}
    status = policy.status()
    shown.update({k: v for k, v in status.items() if k in STATUS_KEYS and v is not None})
    if every_steps is not None:
        shown["next_checkpoint_step"] = (int(entry["step"]) // every_steps + 1) * every_steps
    return shown
