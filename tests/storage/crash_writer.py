"""Child process for the crash-consistency test: save one checkpoint, maybe die half-way.

    python tests/storage/crash_writer.py STORE_URL STEP MODE [KEEP]

MODE is ``sync`` (``save`` with in-memory bytes) or ``async`` (``save_async`` with a writer
that serialises into the staging directory, then ``wait``). Every file operation of the
save is counted. On a local store: each mutating OS call (temp-file creation, each half of
every write, each in-kernel copy call, fsync, rename/replace/link, unlink, rmdir, rmtree).
On a remote store (GCS, S3): each backend write/delete/move hook. With ``KILL_AT=N`` in the
environment the process sends itself SIGKILL just *before* operation N, so no handler,
``finally`` or atexit runs, exactly like a VM that vanishes. On success it prints
``OPS <count>``.

File contents are a pure function of (step, name): see ``expected_files``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `colabjob` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FILE_SIZES = {"model.safetensors": 300_000, "optim/state.bin": 120_000, "rng.json": 700}


def expected_files(step: int) -> dict[str, bytes]:
    """Deterministic content of every file of checkpoint ``step``."""
    out = {}
    for name, size in FILE_SIZES.items():
        seed = hashlib.sha256(f"{step}:{name}".encode()).digest()
        out[name] = (seed * (size // len(seed) + 1))[:size]
    return out


class _Counter:
    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.count = 0
        self.lock = threading.Lock()

    def tick(self) -> None:
        with self.lock:
            self.count += 1
            if self.count == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


def _wrap(counter: _Counter, fn: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        counter.tick()
        return fn(*args, **kwargs)

    return counted


class _CountedFile:
    """A file object whose every write is two counted operations (first half, second half),
    so a kill can leave a torn temp file behind."""

    def __init__(self, f: Any, counter: _Counter) -> None:
        self._f = f
        self._counter = counter

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        half = len(view) // 2
        self._counter.tick()
        self._f.write(view[:half])
        self._f.flush()
        self._counter.tick()
        self._f.write(view[half:])
        return len(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _CountedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def instrument_os(counter: _Counter) -> None:
    """Count the mutating OS calls a local Store makes (looked up on the modules at call time)."""
    names = ["fsync", "replace", "rename", "link", "unlink", "remove", "rmdir"]
    names += ["sendfile", "copy_file_range"]  # in-kernel copies (shutil.copyfile), if used
    for name in names:
        if hasattr(os, name):
            setattr(os, name, _wrap(counter, getattr(os, name)))
    tempfile.mkstemp = _wrap(counter, tempfile.mkstemp)
    shutil.rmtree = _wrap(counter, shutil.rmtree)  # type: ignore[assignment]
    real_fdopen = os.fdopen

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, *args, **kwargs)
        mode = args[0] if args else kwargs.get("mode", "r")
        return _CountedFile(f, counter) if "w" in mode else f

    os.fdopen = fdopen


def instrument_store(store: Any, counter: _Counter) -> None:
    """Count every backend hook that writes, deletes or moves an object."""
    for name in ("_write_bytes", "_put_file", "_create", "_replace", "_delete", "_move"):
        setattr(store, name, _wrap(counter, getattr(store, name)))


def main(argv: list[str]) -> int:
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.store import open_store

    url, step, mode = argv[0], int(argv[1]), argv[2]
    keep = int(argv[3]) if len(argv) > 3 else 2
    kill_at = int(os.environ["KILL_AT"]) if os.environ.get("KILL_AT") else None
    store = open_store(url)
    ckpts = CheckpointStore(store, keep=keep, staging_dir=os.environ.get("STAGING_DIR"))
    files = expected_files(step)
    counter = _Counter(kill_at)
    if "://" in url:
        instrument_store(store, counter)
    else:  # finer-grained: inside each atomic write, not only between them
        instrument_os(counter)
    if mode == "sync":
        ckpts.save(step, files, meta={"writer": "crash_writer"})
    else:

        def writer(staging: Path) -> Mapping[str, Path]:
            out = {}
            for name, data in files.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                out[name] = path
            return out

        ckpts.save_async(step, writer, meta={"writer": "crash_writer"}).wait()
    print(f"OPS {counter.count}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
