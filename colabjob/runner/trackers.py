"""Experiment trackers of a segment: TensorBoard event files and a W&B run, as progress sinks.

Both receive the segment's metrics at its log interval through the ``ProgressSink`` the
runner hands the training loop (``colabjob.jobs.progress``), so every kind and the Session
API feed them alike, with the job's global step.

- TensorBoard (``tensorboard: "auto"``: when the package is installed; ``True``: required):
  each segment writes one event file, first locally, copied to ``tensorboard/<file>`` in the
  job's storage every ``upload_every`` seconds and when the segment ends (so ``gs://`` and
  Drive jobs get them too; point ``tensorboard --logdir`` at the job's ``tensorboard/``, or
  at a copy of it). The file starts with a restart marker at its first step, so TensorBoard
  drops what a killed segment logged past its last commit: each step appears once.
- W&B (``wandb=True``; needs the ``wandb`` package): ``wandb.init(id=..., resume="allow")``
  with one run id per job, kept in the job record's extras (``wandb_run_id``), so every
  session continues the same run; ``run.log(metrics, step=global_step)``.

Neither package is imported unless asked for; a missing one is a ``ConfigError`` when
required (with the pip command), a log line when ``"auto"``.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from colabjob.errors import ConfigError
from colabjob.jobs.progress import STATUS_KEYS

if TYPE_CHECKING:
    from colabjob.jobs.progress import ProgressSink
    from colabjob.storage.store import Store

__all__ = [
    "TB_PREFIX",
    "WANDB_ID_KEY",
    "TensorBoardSink",
    "WandbSink",
    "new_wandb_id",
    "require_trackers",
    "trackers_for",
]

log = logging.getLogger(__name__)

TB_PREFIX = "tensorboard"
_SERIAL = itertools.count()
WANDB_ID_KEY = "wandb_run_id"
Switch = bool | Literal["auto"]


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if k not in STATUS_KEYS
        and k not in ("step", "time")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    }


class TensorBoardSink:
    """One segment's TensorBoard event file, copied into the job's storage."""

    def __init__(
        self,
        store: Store,
        *,
        local_dir: str | os.PathLike[str] | None = None,
        upload_every: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        from colabjob.tensorboard import TensorBoardExport

        self.store = store
        if local_dir is not None:
            Path(local_dir).mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="colabjob-tb-", dir=local_dir)
        self.export = TensorBoardExport(self._tmp.name)
        self.upload_every, self.monotonic = float(upload_every), monotonic
        self._next_upload = monotonic() + self.upload_every
        # Readers take a directory's event files in name order, and a restart marker drops
        # the earlier files' steps from there on: name the copy by creation time (fixed
        # width, so sorting by name is sorting by time, even within one second).
        self.key = (
            f"{TB_PREFIX}/events.out.tfevents.{time.time_ns():019d}."
            f"{socket.gethostname()}.{os.getpid()}.{next(_SERIAL)}.colabjob"
        )
        self._started = False
        self._dirty = False
        # Rows wait here until the next upload: handing each one to tensorboard's writer
        # thread from the training loop cost ~130 µs a row (a lock handoff to that thread).
        self._rows: list[dict[str, Any]] = []

    @property
    def local_file(self) -> Path:
        """The event file (the writer makes exactly one in its own directory)."""
        return next(Path(self._tmp.name).glob("events.out.tfevents.*"))

    def update(self, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        if not self._started:
            self._started = True
            self.export.mark_start(step)
        self._rows.append({"step": step, **_scalars(metrics)})
        if self.monotonic() >= self._next_upload:
            self.upload()

    def event(self, text: str) -> None:
        pass

    def _write_rows(self) -> None:
        rows, self._rows = self._rows, []
        if rows and self.export.add_rows(rows):
            self._dirty = True

    def upload(self, *, flush: bool = True) -> None:
        """Copy the event file into the job's storage (atomically replacing the last copy)."""
        self._next_upload = self.monotonic() + self.upload_every
        self._write_rows()
        if not self._dirty:
            return
        if flush:
            self.export.flush()
        self.store.put_file(self.local_file, self.key)
        self._dirty = False

    def close(self) -> None:
        try:
            self._write_rows()
            self.export.close()  # flushes
            self.upload(flush=False)
        finally:
            self._tmp.cleanup()


def new_wandb_id() -> str:
    return uuid.uuid4().hex[:16]


class WandbSink:
    """Logs to the job's one W&B run (created on the first update, resumed after that)."""

    def __init__(
        self,
        *,
        run_id: str,
        project: str,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        directory: str | os.PathLike[str] | None = None,
        module: Any = None,
    ) -> None:
        self.wandb = module if module is not None else import_wandb()
        self.run_id, self.project, self.name = run_id, project, name
        self.config = dict(config or {})
        self.directory = os.fspath(directory) if directory is not None else tempfile.gettempdir()
        self.run: Any = None

    def _start(self) -> Any:
        if self.run is None:
            self.run = self.wandb.init(
                id=self.run_id,
                resume="allow",
                project=self.project,
                name=self.name,
                config=self.config,
                dir=self.directory,
            )
        return self.run

    def update(self, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        self._start().log(_scalars(metrics), step=step)

    def event(self, text: str) -> None:
        pass

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def import_wandb() -> Any:
    try:
        return importlib.import_module("wandb")
    except ImportError as e:
        raise ConfigError(
            "W&B logging is on but the wandb package is not installed",
            hint="pip install wandb (and `wandb login`), or turn it off "
            "(--set logging.wandb=false / wandb=False)",
        ) from e


def _tensorboard_available() -> bool:
    try:
        importlib.import_module("tensorboard.summary.writer.event_file_writer")
    except ImportError:
        return False
    return True


def require_trackers(*, tensorboard: Switch, wandb: bool) -> None:
    """Raise ``ConfigError`` (with the pip command) when a required tracker is missing;
    called before the segment takes the lease, so nothing has changed yet."""
    if wandb:
        import_wandb()
    if tensorboard is True and not _tensorboard_available():
        raise ConfigError(
            "TensorBoard logging is on but the tensorboard package is not installed",
            hint="pip install tensorboard, or set logging.tensorboard: auto (or false)",
        )


def trackers_for(
    store: Store,
    *,
    tensorboard: Switch = "auto",
    wandb: bool = False,
    wandb_id: str | None = None,
    wandb_project: str | None = None,
    job_name: str = "job",
    config: Mapping[str, Any] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    say: Callable[[str], None] | None = None,
) -> list[ProgressSink]:
    """The sinks a segment's metrics go to besides the display (see the module docstring)."""
    sinks: list[ProgressSink] = []
    if wandb:
        if wandb_id is None:
            raise ConfigError("W&B logging needs the job's run id (from its record)")
        sinks.append(
            WandbSink(
                run_id=wandb_id,
                project=wandb_project or "colabjob",
                name=job_name,
                config=config,
                directory=local_dir,
            )
        )
    if tensorboard is True or (tensorboard == "auto" and _tensorboard_available()):
        sinks.append(TensorBoardSink(store, local_dir=local_dir, monotonic=monotonic))
    elif tensorboard == "auto" and say is not None:
        say("TensorBoard logs off: the tensorboard package is not installed "
            "(pip install tensorboard)")
    return sinks
