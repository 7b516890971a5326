"""Helpers for the checkpoint suites: deterministic checkpoint contents, and a Store wrapper
that calls ``before(op, key)`` ahead of every backend operation.

Tests use the wrapper to record the order of operations (retention deletes the manifest before the
data) and to hold an operation on a ``threading.Event`` (a remote that is slow exactly when
the test says so, without any timing). It is a real ``Store``, so validation and the retry
policy still apply on top of it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

from colabjob.storage.checkpoints import CheckpointInfo, CheckpointStore
from colabjob.storage.retry import RetryPolicy
from colabjob.storage.store import Store, Version


def payload(step: int, name: str, size: int = 2048) -> bytes:
    seed = hashlib.sha256(f"{step}/{name}".encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def files_for(step: int) -> dict[str, bytes]:
    """The files of checkpoint ``step`` in these suites (content depends on the step)."""
    return {"model.bin": payload(step, "model", 5000), "sub/opt.bin": payload(step, "opt", 777)}


def assert_intact(ckpts: CheckpointStore, info: CheckpointInfo) -> None:
    """Every file reads back verified and equal to what was saved."""
    for name, data in files_for(info.step).items():
        assert ckpts.read(info, name) == data


class HookedStore(Store):
    def __init__(
        self,
        inner: Store,
        before: Callable[[str, str], None],
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(inner.url, retry=retry or inner.retry_policy)
        self.inner = inner
        self.before = before
        self.crc32c_supported = inner.crc32c_supported

    def _hook(self, op: str, key: str) -> None:
        self.before(op, key)

    def _child(self, prefix: str) -> Store:
        return HookedStore(self.inner.child(prefix), self.before, retry=self.retry_policy)

    def _read_bytes(self, key: str) -> bytes:
        self._hook("read_bytes", key)
        return self.inner.read_bytes(key)

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._hook("write_bytes", key)
        self.inner.write_bytes(key, data)

    def _put_file(self, local_path: str, key: str) -> None:
        self._hook("put_file", key)
        self.inner.put_file(local_path, key)

    def _get_file(self, key: str, local_path: str) -> None:
        self._hook("get_file", key)
        self.inner.get_file(key, local_path)

    def _exists(self, key: str) -> bool:
        self._hook("exists", key)
        return self.inner.exists(key)

    def _size(self, key: str) -> int:
        self._hook("size", key)
        return self.inner.size(key)

    def _list(self, prefix: str) -> list[str]:
        self._hook("list", prefix)
        return self.inner.list(prefix)

    def _list_dirs(self, prefix: str) -> list[str]:
        self._hook("list_dirs", prefix)
        return self.inner.list_dirs(prefix)

    def _delete(self, key: str) -> None:
        self._hook("delete", key)
        self.inner.delete(key)

    def _delete_prefix(self, prefix: str) -> None:
        self._hook("delete_prefix", prefix)
        self.inner.delete_prefix(prefix)

    def _move(self, src: str, dst: str) -> None:
        self._hook("move", src)
        self.inner.move(src, dst)

    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        self._hook("read_versioned", key)
        return self.inner.read_versioned(key)

    def _create(self, key: str, data: bytes) -> Version:
        self._hook("create", key)
        return self.inner.create(key, data)

    def _replace(self, key: str, data: bytes, expected: Version) -> Version:
        self._hook("replace", key)
        return self.inner.replace(key, data, expected)

    def _flush(self) -> None:
        self._hook("flush", "")
        self.inner.flush()


class Recorder:
    """``before`` hook that records ``(op, key)`` in order (thread-safe)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, op: str, key: str) -> None:
        with self._lock:
            self.events.append((op, key))

    def index(self, op: str, key: str) -> int:
        return self.events.index((op, key))


class Gate:
    """``before`` hook that blocks every upload (put_file/write_bytes) until ``open()``."""

    UPLOADS = frozenset({"put_file", "write_bytes"})

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.reached = threading.Event()

    def __call__(self, op: str, key: str) -> None:
        if op in self.UPLOADS:
            self.reached.set()
            if not self.opened.wait(timeout=60):
                raise AssertionError("gate never opened")

    def open(self) -> None:
        self.opened.set()
