"""Bulk objects in an object-store bucket through an fsspec filesystem: the half of a
``Store`` that GCS (gcsfs) and S3 (s3fs) share.

Every upload to an object store is atomic on its own (an object appears whole or not at
all), so a bulk write is a single ``pipe_file``/``put_file``; a download lands in a local
temp file first (``atomic_local_fetch``). A "directory" is only a common prefix: listings
go to the server each time (the filesystems are built without a listings cache), because
other processes write too. Control objects (create-only, compare-and-swap) differ per
service and stay in the backends (``gcs.py``, ``s3.py``), each of which brings its lazily
built clients (``fs`` the fsspec filesystem, shared with children) and a one-call check that
its bucket exists, run once when a store is opened.
"""

from __future__ import annotations

import abc
from contextlib import suppress
from typing import Any, Generic, Protocol, TypeVar

from colabjob.storage.local import atomic_local_fetch
from colabjob.storage.retry import RetryPolicy
from colabjob.storage.store import Store, check_key, join_key

__all__ = ["BucketStore"]


class _Clients(Protocol):
    @property
    def fs(self) -> Any:
        """The fsspec filesystem."""


ClientsT = TypeVar("ClientsT", bound=_Clients)


class BucketStore(Store, Generic[ClientsT]):
    """A Store under ``bucket/prefix`` of an fsspec object-store filesystem (``clients.fs``)."""

    def __init__(
        self,
        url: str,
        bucket: str,
        prefix: str,
        *,
        clients: ClientsT,
        retry: RetryPolicy | None,
        check_bucket: bool,
    ) -> None:
        super().__init__(url, retry=retry)
        self._bucket = bucket
        self._prefix = prefix
        self._clients = clients
        if check_bucket:
            self._call(self._check_bucket)

    @abc.abstractmethod
    def _check_bucket(self) -> None:
        """``BucketNotFoundError`` when the bucket does not exist (one cheap listing)."""

    @property
    def _fs(self) -> Any:
        return self._clients.fs

    def fsspec_target(self, key: str) -> tuple[object, str] | None:
        """This store's own filesystem and ``bucket/object-name``: every process that can
        open the store (other machines included) writes there, each file one upload."""
        return self._fs, self._path(check_key(key))

    def _name(self, key: str) -> str:
        """Object name inside the bucket."""
        return join_key(self._prefix, key)

    def _path(self, key: str) -> str:
        """fsspec path: bucket/object-name."""
        return join_key(self._bucket, self._name(key))

    def _rel(self, path: str) -> str:
        root = self._path("") + "/"
        return path[len(root) :] if path.startswith(root) else path

    def _read_bytes(self, key: str) -> bytes:
        data: bytes = self._fs.cat_file(self._path(key))
        return data

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._fs.pipe_file(self._path(key), data)

    def _put_file(self, local_path: str, key: str) -> None:
        self._fs.put_file(local_path, self._path(key))

    def _get_file(self, key: str, local_path: str) -> None:
        fs = self._fs
        atomic_local_fetch(local_path, lambda tmp: fs.get_file(self._path(key), tmp))

    def _info(self, key: str) -> dict[str, Any]:
        info: dict[str, Any] = self._fs.info(self._path(key))
        if info.get("type") != "file":
            raise FileNotFoundError(self.url_of(key))
        return info

    def _exists(self, key: str) -> bool:
        try:
            self._info(key)
        except FileNotFoundError:
            return False
        return True

    def _size(self, key: str) -> int:
        return int(self._info(key)["size"])

    def _list(self, prefix: str) -> list[str]:
        try:
            paths = self._fs.find(self._path(prefix), withdirs=False)
        except FileNotFoundError:
            return []
        return [self._rel(p) for p in paths]

    def _list_dirs(self, prefix: str) -> list[str]:
        try:
            entries = self._fs.ls(self._path(prefix), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return [
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
        ]

    def _delete(self, key: str) -> None:
        with suppress(FileNotFoundError):
            self._fs.rm_file(self._path(key))

    def _delete_prefix(self, prefix: str) -> None:
        under = prefix + "/" if prefix else ""
        for key in self._list(prefix):
            if key.startswith(under):
                self._delete(key)

    def _move(self, src: str, dst: str) -> None:
        self._fs.copy(self._path(src), self._path(dst))
        self._delete(src)

    def _flush(self) -> None:
        pass  # an upload is durable once it returns
