"""In-process ``memory://name`` stores for tests and demos.

Objects live in a dict per name, shared by every store opened on the same name in this
process (like fsspec's memory filesystem), guarded by one lock per name so create-only and
compare-and-swap behave as on a real backend under threads. Versions are a per-name counter.
Nothing here is durable: it dies with the process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from colabjob.errors import AlreadyExistsError, PreconditionFailedError, UnsupportedURLError
from colabjob.storage.local import atomic_local_write
from colabjob.storage.retry import RetryPolicy
from colabjob.storage.store import Store, Version, join_key

__all__ = ["MemoryStore"]


@dataclass
class _Space:
    lock: threading.Lock = field(default_factory=threading.Lock)
    objects: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    counter: int = 0

    def put(self, path: str, data: bytes) -> Version:
        self.counter += 1
        self.objects[path] = (data, self.counter)
        return Version(token=str(self.counter))


_SPACES: dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


def _space(name: str) -> _Space:
    with _SPACES_LOCK:
        return _SPACES.setdefault(name, _Space())


class MemoryStore(Store):
    """A Store in this process's memory, rooted at ``memory://name[/prefix]``."""

    def __init__(self, name: str, prefix: str = "", *, retry: RetryPolicy | None = None) -> None:
        if not name:
            raise ValueError("memory:// store needs a name: memory://NAME[/prefix]")
        super().__init__(f"memory://{join_key(name, prefix)}", retry=retry)
        self._name = name
        self._prefix = prefix
        self._space = _space(name)

    @classmethod
    def from_url(cls, url: str, *, retry: RetryPolicy | None = None) -> MemoryStore:
        rest = url.split("://", 1)[1].strip("/")
        name, _, prefix = rest.partition("/")
        if not name:
            raise UnsupportedURLError(
                f"memory:// URL without a name: {url!r}", hint="use memory://NAME[/prefix]"
            )
        return cls(name, prefix.strip("/"), retry=retry)

    def _p(self, key: str) -> str:
        return join_key(self._prefix, key)

    def _child(self, prefix: str) -> Store:
        return MemoryStore(self._name, self._p(prefix), retry=self.retry_policy)

    def _get(self, key: str) -> tuple[bytes, int]:
        with self._space.lock:
            entry = self._space.objects.get(self._p(key))
        if entry is None:
            raise FileNotFoundError(self.url_of(key))
        return entry

    def _read_bytes(self, key: str) -> bytes:
        return self._get(key)[0]

    def _write_bytes(self, key: str, data: bytes) -> None:
        with self._space.lock:
            self._space.put(self._p(key), data)

    def _put_file(self, local_path: str, key: str) -> None:
        with open(local_path, "rb") as f:
            self._write_bytes(key, f.read())

    def _get_file(self, key: str, local_path: str) -> None:
        data = self._read_bytes(key)
        atomic_local_write(local_path, lambda f: f.write(data))

    def _exists(self, key: str) -> bool:
        with self._space.lock:
            return self._p(key) in self._space.objects

    def _size(self, key: str) -> int:
        return len(self._get(key)[0])

    def _under(self, prefix: str) -> list[str]:
        """Keys (relative to this store's root) below ``prefix``."""
        base = self._p(prefix)
        start = base + "/" if base else ""
        root = self._prefix + "/" if self._prefix else ""
        with self._space.lock:
            paths = list(self._space.objects)
        return [p[len(root) :] for p in paths if p.startswith(start)]

    def _list(self, prefix: str) -> list[str]:
        return self._under(prefix)

    def _list_dirs(self, prefix: str) -> list[str]:
        cut = len(prefix) + 1 if prefix else 0
        return [k[cut:].split("/", 1)[0] for k in self._under(prefix) if "/" in k[cut:]]

    def _delete(self, key: str) -> None:
        with self._space.lock:
            self._space.objects.pop(self._p(key), None)

    def _delete_prefix(self, prefix: str) -> None:
        for key in self._under(prefix):
            self._delete(key)

    def _move(self, src: str, dst: str) -> None:
        with self._space.lock:
            entry = self._space.objects.pop(self._p(src), None)
            if entry is None:
                raise FileNotFoundError(self.url_of(src))
            self._space.put(self._p(dst), entry[0])

    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        with self._space.lock:
            entry = self._space.objects.get(self._p(key))
        if entry is None:
            return None
        return entry[0], Version(token=str(entry[1]))

    def _create(self, key: str, data: bytes) -> Version:
        with self._space.lock:
            if self._p(key) in self._space.objects:
                raise AlreadyExistsError(f"{self.url_of(key)} already exists")
            return self._space.put(self._p(key), data)

    def _replace(self, key: str, data: bytes, expected: Version) -> Version:
        with self._space.lock:
            entry = self._space.objects.get(self._p(key))
            if entry is None or str(entry[1]) != expected.token:
                raise PreconditionFailedError(
                    f"{self.url_of(key)} changed since version {expected.token}"
                    if entry is not None
                    else f"{self.url_of(key)} no longer exists"
                )
            return self._space.put(self._p(key), data)

    def _flush(self) -> None:
        pass
