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
``next_checkpoint_step``. Anything else is shown as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


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
