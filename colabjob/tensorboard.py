"""TensorBoard event files from a job's committed metrics (optional: needs ``tensorboard``).

``colabjob logs --tensorboard DIR`` writes them from the committed history; a running
segment writes them live into the job's ``tensorboard/`` (``colabjob.runner.trackers``),
marking where it (re)started so that TensorBoard drops the steps a killed segment logged
after its last commit and the next one redid: each step appears once and the global step
runs on across sessions. ``TensorBoardExport`` appends only rows newer than what it already
wrote. Uses tensorboard's own event writer; neither TensorFlow nor torch is loaded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from colabjob.errors import ConfigError

_SKIP = {"step", "epoch", "time", "event", "deadline", "next_checkpoint_at", "next_checkpoint_step"}


class TensorBoardExport:
    """Scalars of metric rows, one event file under ``logdir``, each step written once."""

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as e:
            raise ConfigError(
                "TensorBoard export needs the tensorboard package",
                hint="pip install tensorboard",
            ) from e
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        os.makedirs(logdir, exist_ok=True)
        self.writer = EventFileWriter(os.fspath(logdir), filename_suffix=".colabjob")
        self.last_step: int | None = None
        self.scalars = 0

    def mark_start(self, step: int) -> None:
        """Record that training (re)starts at ``step``: TensorBoard's readers then drop any
        earlier file's events from ``step`` on (those of a killed segment that this one
        redoes), so each step is shown once."""
        event = self._event_pb2.Event(
            wall_time=time.time(),
            step=step,
            session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START),
        )
        self.writer.add_event(event)

    def add_rows(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Write the rows past ``last_step``; returns how many rows were written."""
        written = 0
        for row in rows:
            step = row.get("step")
            if "event" in row or not isinstance(step, int):
                continue
            if self.last_step is not None and step <= self.last_step:
                continue
            values = [
                self._summary_pb2.Summary.Value(tag=f"train/{k}", simple_value=float(v))
                for k, v in row.items()
                if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
            if not values:
                continue
            t = row.get("time")
            event = self._event_pb2.Event(
                wall_time=float(t) if isinstance(t, (int, float)) else time.time(),
                step=step,
                summary=self._summary_pb2.Summary(value=values),
            )
            self.writer.add_event(event)
            self.last_step, self.scalars = step, self.scalars + len(values)
            written += 1
        # no flush here: it waits for the writer thread (hundreds of µs), and this runs in
        # the training loop; upload() and close() flush
        return written

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
