"""Local staging and background work for checkpoint commits.

A save can be split in two: the fast part (serialise the snapshot to local disk, the
*staging* directory) and the slow part (upload to a remote store and commit). This module
owns the first part and the thread that runs the second: it turns what a caller hands in
(bytes, paths, a directory, or a writer callable) into named local sources, runs the commit
on a background thread and exposes it as a ``PendingCommit``. It also holds the small
thread-pool helper the commit uses. Plain threads are used instead of
``concurrent.futures``, which refuses new work once the main thread has returned, exactly
when a final checkpoint may still be uploading.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, NoReturn, TypeAlias, TypeVar

from colabjob.errors import ConfigError

from .manifest import check_name

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")



@dataclass(frozen=True, kw_only=True)
class Written:
    """A file already written at its place under the checkpoint's prefix (by every rank of
    a sharded save, hashed as it was written): the commit lists it with this size and
    sha256 and checks the stored size, without reading or copying it."""

    size: int
    sha256: str


FileSource: TypeAlias = "bytes | str | os.PathLike[str] | Written"
Writer: TypeAlias = "Callable[[Path], Mapping[str, FileSource]]"
FilesArg: TypeAlias = "Mapping[str, FileSource] | Writer | str | os.PathLike[str]"


def files_of_dir(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Every regular file under ``root`` by its ``/``-separated relative name."""
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"checkpoint source {base} is not a directory")
    out = {p.relative_to(base).as_posix(): p for p in sorted(base.rglob("*")) if p.is_file()}
    if not out:
        raise ConfigError(f"checkpoint source directory {base} holds no files")
    return out


def normalize(
    files: Mapping[str, FileSource], *, base: Path | None = None
) -> dict[str, bytes | Path | Written]:
    """Validate names and turn every source into bytes or an existing local ``Path``."""
    if not files:
        raise ConfigError("a checkpoint needs at least one file")
    out: dict[str, bytes | Path | Written] = {}
    for name, src in files.items():
        check_name(name)
        if isinstance(src, Written):
            out[name] = src
            continue
        if isinstance(src, bytes | bytearray | memoryview):
            out[name] = bytes(src)
            continue
        path = Path(src)
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise ConfigError(f"checkpoint file {name!r}: {path} is not a file")
        out[name] = path
    return out


def resolve(files: FilesArg, staging: Path | None = None) -> dict[str, bytes | Path | Written]:
    """Sources of a save: a mapping, a directory, or (with ``staging``) a writer's output."""
    if callable(files):
        if staging is None:
            raise ConfigError("a writer callable needs a staging directory")
        return normalize(files(staging), base=staging)
    if isinstance(files, str | os.PathLike):
        return normalize(files_of_dir(files))
    return normalize(files)


def stage_copies(
    sources: Mapping[str, bytes | Path | Written], staging: Path
) -> dict[str, bytes | Path | Written]:
    """Copy path sources into ``staging`` so the caller may reuse its files at once."""
    out: dict[str, bytes | Path | Written] = {}
    for name, src in sources.items():
        if isinstance(src, bytes | Written):
            out[name] = src  # immutable: nothing to protect
            continue
        dst = staging / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        out[name] = dst
    return out


def make_staging_dir(parent: str | os.PathLike[str] | None, step: int) -> Path:
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"colabjob-stage-{step:012d}-", dir=parent))


def parallel(fn: Callable[[T], R], items: Iterable[T], *, workers: int) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``workers`` threads; the first error stops the rest."""
    todo = list(enumerate(items))
    results: list[R | None] = [None] * len(todo)
    if len(todo) <= 1 or workers <= 1:
        return [fn(x) for _, x in todo]
    work: queue.SimpleQueue[tuple[int, T]] = queue.SimpleQueue()
    for pair in todo:
        work.put(pair)
    errors: list[BaseException] = []
    failed = threading.Event()

    def worker() -> None:
        while not failed.is_set():
            try:
                i, x = work.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = fn(x)
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)
                failed.set()

    threads = [
        threading.Thread(target=worker, name=f"colabjob-io-{n}", daemon=True)
        for n in range(min(workers, len(todo)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def _done() -> NoReturn:
    raise RuntimeError("this commit already ran")


class PendingCommit(Generic[T]):
    """A commit running on a background thread. ``wait()`` returns its result or re-raises."""

    def __init__(self, step: int, work: Callable[[], T]) -> None:
        self.step = step
        self._work = work
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        # Not a daemon: a script that returns right after its last save still commits it.
        self._thread = threading.Thread(
            target=self._run, name=f"colabjob-commit-{step}", daemon=False
        )

    def start(self) -> PendingCommit[T]:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._result = self._work()
        except BaseException as e:
            self._error = e
            log.error("background commit of step %d failed: %s", self.step, e)
        finally:
            # The work holds the snapshot it wrote: drop it now, or a whole copy of the
            # training state would stay alive until the next checkpoint replaces this one.
            self._work = _done
            self._done.set()

    def done(self) -> bool:
        """True once the commit finished, successfully or not."""
        return self._done.is_set()

    def failed(self) -> bool:
        return self._done.is_set() and self._error is not None

    def wait(self, timeout: float | None = None) -> T:
        """Block until committed and return its result; re-raise the commit's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"checkpoint of step {self.step} is still uploading")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def __repr__(self) -> str:
        state = "failed" if self.failed() else "done" if self.done() else "uploading"
        return f"PendingCommit(step={self.step}, {state})"
