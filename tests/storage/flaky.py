"""A hand-written flaky Store for fault-injection tests, importable as ``tests.storage.flaky``.

``FlakyStore(inner, rate=0.3, seed=0)`` is a real ``Store`` (so its public methods go through
the same retry policy as every backend) whose backend operations fail a seeded fraction of
the time with a realistic transient error *before* delegating to ``inner`` — or, with
``when="after"``, after ``inner`` has applied the operation (the reply was lost: the case
where a retried create-only/compare-and-swap meets its own earlier write). ``permanent``
makes every call fail with that exception instead. ``calls`` / ``failures`` count backend
attempts per operation name.

    store = FlakyStore(open_store("memory://x"), rate=0.5, seed=1, retry=RetryPolicy(sleep=...))
"""

from __future__ import annotations

import errno
import random
import threading
from collections import Counter
from collections.abc import Callable
from typing import Literal, TypeVar

from colabjob.storage.retry import RetryPolicy
from colabjob.storage.store import Store, Version

__all__ = ["FakeHTTPError", "FlakyStore", "transient_errors"]

T = TypeVar("T")


class FakeHTTPError(Exception):
    """Shaped like gcsfs's ``HttpError`` / google-api-core errors: an HTTP ``code``."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"HTTP {code}")
        self.code = code


def transient_errors() -> list[Callable[[], BaseException]]:
    """Factories of errors every backend can meet and retry.py must treat as transient."""
    return [
        lambda: OSError(errno.ENOTCONN, "Transport endpoint is not connected"),
        lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        lambda: TimeoutError("read timed out"),
        lambda: FakeHTTPError(503, "Service Unavailable"),
        lambda: FakeHTTPError(429, "Too Many Requests"),
    ]


class FlakyStore(Store):
    """Wraps a Store; fails a seeded fraction of backend calls (see module docstring)."""

    def __init__(
        self,
        inner: Store,
        *,
        rate: float = 0.3,
        seed: int = 0,
        when: Literal["before", "after"] = "before",
        permanent: BaseException | None = None,
        only: set[str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(inner.url, retry=retry)
        self.inner = inner
        self.rate = rate
        self.when = when
        self.permanent = permanent
        self.only = only
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.crc32c_supported = inner.crc32c_supported
        self._rng = random.Random(seed)
        self._errors = transient_errors()
        self._lock = threading.Lock()

    def _fault(self, op: str) -> BaseException | None:
        with self._lock:
            self.calls[op] += 1
            if self.only is not None and op not in self.only:
                return None
            if self.permanent is not None:
                self.failures[op] += 1
                return self.permanent
            if self._rng.random() >= self.rate:
                return None
            self.failures[op] += 1
            return self._rng.choice(self._errors)()

    def _do(self, op: str, fn: Callable[[], T]) -> T:
        fault = self._fault(op)
        if fault is not None and self.when == "before":
            raise fault
        result = fn()
        if fault is not None:
            raise fault
        return result

    def _child(self, prefix: str) -> Store:
        child = FlakyStore(
            self.inner.child(prefix),
            rate=self.rate,
            when=self.when,
            permanent=self.permanent,
            only=self.only,
            retry=self.retry_policy,
        )
        child._rng = self._rng
        child.calls, child.failures, child._lock = self.calls, self.failures, self._lock
        return child

    def _read_bytes(self, key: str) -> bytes:
        return self._do("read_bytes", lambda: self.inner.read_bytes(key))

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._do("write_bytes", lambda: self.inner.write_bytes(key, data))

    def _put_file(self, local_path: str, key: str) -> None:
        self._do("put_file", lambda: self.inner.put_file(local_path, key))

    def _get_file(self, key: str, local_path: str) -> None:
        self._do("get_file", lambda: self.inner.get_file(key, local_path))

    def _exists(self, key: str) -> bool:
        return self._do("exists", lambda: self.inner.exists(key))

    def _size(self, key: str) -> int:
        return self._do("size", lambda: self.inner.size(key))

    def _list(self, prefix: str) -> list[str]:
        return self._do("list", lambda: self.inner.list(prefix))

    def _list_dirs(self, prefix: str) -> list[str]:
        return self._do("list_dirs", lambda: self.inner.list_dirs(prefix))

    def _delete(self, key: str) -> None:
        self._do("delete", lambda: self.inner.delete(key))

    def _delete_prefix(self, prefix: str) -> None:
        self._do("delete_prefix", lambda: self.inner.delete_prefix(prefix))

    def _move(self, src: str, dst: str) -> None:
        self._do("move", lambda: self.inner.move(src, dst))

    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        return self._do("read_versioned", lambda: self.inner.read_versioned(key))

    def _create(self, key: str, data: bytes) -> Version:
        return self._do("create", lambda: self.inner.create(key, data))

    def _replace(self, key: str, data: bytes, expected: Version) -> Version:
        return self._do("replace", lambda: self.inner.replace(key, data, expected))

    def _flush(self) -> None:
        self._do("flush", self.inner.flush)

    def crc32c(self, key: str) -> str | None:
        return self.inner.crc32c(key)
