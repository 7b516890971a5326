"""Durable bytes under one root URL: the ``Store`` interface and its registry.

A job lives under one root URL (a local path, the Colab Drive mount, ``gs://bucket/prefix``,
``s3://bucket/prefix`` or ``memory://name``). Everything above this layer speaks in
``/``-separated keys relative to that root and never sees a backend. Two kinds of object live here:

* bulk objects (checkpoint files): written whole and atomically, never updated in place;
* control objects (lease, job record, pointers): small JSON documents with a ``Version``,
  written with create-only or compare-and-swap preconditions.

Backends are imported lazily by scheme (like fsspec's registry), so importing this module
costs nothing heavy and never imports torch; a missing backend package is named in the error.
``Store``'s public methods validate keys and run the backend's ``_method`` through the one
retry policy (``colabjob.storage.retry``), so every backend gets the same classification,
translation and backoff.

INTERFACE CONTRACT (implemented by LocalStore, MemoryStore, DriveStore, GCSStore, S3Store):
    url                      the root URL, normalised
    child(prefix)            a Store rooted at url/prefix
    read_bytes(key)          -> bytes                 ObjectNotFoundError if missing
    write_bytes(key, data)   atomic whole-object write (readers see old or new, never part)
    put_file(local, key)     atomic upload of a local file
    get_file(key, local)     download to a local path (written atomically there too)
    exists(key)              -> bool
    size(key)                -> int                    ObjectNotFoundError if missing
    list(prefix="")          -> sorted keys (files only, recursive) under prefix, relative to root
    list_dirs(prefix="")     -> sorted names of the immediate "directories" under prefix
    delete(key)              missing is not an error
    delete_prefix(prefix)    delete every object under prefix
    move(src, dst)           rename one object (copy + delete where the backend has no rename)
    read_versioned(key)      -> (bytes, Version) | None
    create(key, data)        -> Version; AlreadyExistsError if the key exists
    replace(key, data, expected: Version) -> Version; PreconditionFailedError if changed
    flush()                  make everything written so far durable (Drive: flush_and_unmount)
    crc32c_supported         True where the backend reports crc32c (GCS)
    versions_track_writes    False where a Version is a content hash (S3's ETag): rewriting
                             identical bytes is then not a change for ``replace``

Prefixes are directory-like: ``list("ckpt")`` and ``list("ckpt/")`` both mean "everything
below ``ckpt/``", never ``ckpt-old/x``. A "directory" exists only while it holds an object,
as on an object store. Keys must not be empty, start with ``/``, contain ``.``/``..`` or
empty segments, or have a segment starting with ``.colabjob-`` (reserved for temp files).
"""

from __future__ import annotations

import abc
import builtins
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from colabjob.errors import (
    AlreadyExistsError,
    PreconditionFailedError,
    UnsupportedURLError,
)
from colabjob.storage.retry import DEFAULT_POLICY, RetryPolicy

__all__ = ["RESERVED_PREFIX", "Store", "Version", "open_store", "register_backend"]

T = TypeVar("T")

RESERVED_PREFIX = ".colabjob-"
DRIVE_ROOT_ENV = "COLABJOB_DRIVE_ROOT"
DEFAULT_DRIVE_ROOT = "/content/drive"


@dataclass(frozen=True, kw_only=True)
class Version:
    """Opaque version token of a control object (GCS generation, local stat+hash, counter)."""

    token: str

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("Version token must not be empty")


def check_key(key: str) -> str:
    """Validate an object key; return it unchanged."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    _check_parts(key, key.split("/"))
    return key


def norm_prefix(prefix: str) -> str:
    """Validate a prefix; return it without a trailing ``/`` (``""`` is the root)."""
    if not isinstance(prefix, str):
        raise ValueError(f"storage prefix must be a string, got {prefix!r}")
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if stripped:
        _check_parts(prefix, stripped.split("/"))
    return stripped


def _check_parts(original: str, parts: list[str]) -> None:
    for part in parts:
        if part in ("", ".", "..") or part.startswith(RESERVED_PREFIX) or "\\" in part:
            raise ValueError(
                f"invalid storage key {original!r}: use '/'-separated relative names without "
                f"empty, '.', '..' or '{RESERVED_PREFIX}*' segments"
            )


def join_key(prefix: str, key: str) -> str:
    """``prefix/key`` where either may be empty."""
    if not prefix:
        return key
    return f"{prefix}/{key}" if key else prefix


class Store(abc.ABC):
    """Durable objects under one root URL. See the module docstring for the contract."""

    crc32c_supported: bool = False
    versions_track_writes: bool = True

    def __init__(self, url: str, *, retry: RetryPolicy | None = None) -> None:
        self._url = url.rstrip("/") if url not in ("/",) else url
        self._retry = retry or DEFAULT_POLICY

    @property
    def url(self) -> str:
        return self._url

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._retry

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._url!r})"

    def url_of(self, key: str) -> str:
        """The full URL of ``key`` (for messages and logs)."""
        return f"{self._url.rstrip('/')}/{key}" if key else self._url

    def fsspec_target(self, key: str) -> tuple[object, str] | None:
        """An fsspec filesystem and path through which any process of this machine (or of
        the job's others, for a shared store) writes ``key`` in place, or None where there
        is none (``memory://``). Bytes written so bypass the retry policy and atomicity:
        only for files under a checkpoint prefix that its manifest, written last, lists."""
        return None

    def _call(self, fn: Callable[[], T], key: str = "") -> T:
        return self._retry.call(fn, target=self.url_of(key))

    # ---- public API: validation + retry around the backend's _methods -----------------

    def child(self, prefix: str) -> Store:
        p = norm_prefix(prefix)
        if not p:
            return self
        return self._child(p)

    def read_bytes(self, key: str) -> bytes:
        k = check_key(key)
        return self._call(lambda: self._read_bytes(k), k)

    def write_bytes(self, key: str, data: bytes) -> None:
        k = check_key(key)
        payload = bytes(data)
        self._call(lambda: self._write_bytes(k, payload), k)

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        k = check_key(key)
        src = os.fspath(local_path)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"put_file: no local file {src!r}")
        self._call(lambda: self._put_file(src, k), k)

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        k = check_key(key)
        dst = os.fspath(local_path)
        self._call(lambda: self._get_file(k, dst), k)

    def exists(self, key: str) -> bool:
        k = check_key(key)
        return self._call(lambda: self._exists(k), k)

    def size(self, key: str) -> int:
        k = check_key(key)
        return self._call(lambda: self._size(k), k)

    def list(self, prefix: str = "") -> builtins.list[str]:
        p = norm_prefix(prefix)
        keys = self._call(lambda: self._list(p), p)
        under = p + "/" if p else ""
        return sorted(k for k in keys if k.startswith(under))

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        p = norm_prefix(prefix)
        return sorted(set(self._call(lambda: self._list_dirs(p), p)))

    def delete(self, key: str) -> None:
        k = check_key(key)
        self._call(lambda: self._delete(k), k)

    def delete_prefix(self, prefix: str) -> None:
        p = norm_prefix(prefix)
        self._call(lambda: self._delete_prefix(p), p)

    def move(self, src: str, dst: str) -> None:
        s, d = check_key(src), check_key(dst)
        if s == d:
            return
        attempt = 0

        def op() -> None:
            nonlocal attempt
            attempt += 1
            # A retried move whose first try landed before the error: already done.
            if attempt > 1 and not self._exists(s) and self._exists(d):
                return
            self._move(s, d)

        self._call(op, s)

    def read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        k = check_key(key)
        return self._call(lambda: self._read_versioned(k), k)

    def create(self, key: str, data: bytes) -> Version:
        k = check_key(key)
        payload = bytes(data)
        return self._conditional(k, payload, lambda: self._create(k, payload), AlreadyExistsError)

    def replace(self, key: str, data: bytes, expected: Version) -> Version:
        k = check_key(key)
        if not isinstance(expected, Version):
            raise TypeError(f"expected must be a Version, got {expected!r}")
        payload = bytes(data)
        return self._conditional(
            k, payload, lambda: self._replace(k, payload, expected), PreconditionFailedError
        )

    def _conditional(
        self,
        key: str,
        data: bytes,
        write: Callable[[], Version],
        lost: type[PreconditionFailedError],
    ) -> Version:
        """``write`` (a conditional write of ``data`` to ``key``) under the retry policy; a
        retry that fails with ``lost`` because our own earlier try landed returns its version."""
        attempt = 0

        def op() -> Version:
            nonlocal attempt
            attempt += 1
            try:
                return write()
            except lost:
                if (mine := self._own_earlier_write(attempt, key, data)) is None:
                    raise
                return mine

        return self._call(op, key)

    def _own_earlier_write(self, attempt: int, key: str, data: bytes) -> Version | None:
        """After a transient error the server may have applied our write anyway; a retry then
        loses its precondition against ourselves. If the object now holds exactly our bytes,
        that write was ours (control objects carry an owner id, so a stranger's identical
        bytes are not a practical concern)."""
        if attempt > 1:
            current = self._read_versioned(key)
            if current is not None and current[0] == data:
                return current[1]
        return None

    def flush(self) -> None:
        self._call(self._flush)

    def crc32c(self, key: str) -> str | None:
        """The backend's crc32c of ``key`` (base64, as GCS reports it), None where the
        backend keeps none (``crc32c_supported`` is False)."""
        check_key(key)
        return None

    # ---- backend hooks ----------------------------------------------------------------

    @abc.abstractmethod
    def _child(self, prefix: str) -> Store: ...
    @abc.abstractmethod
    def _read_bytes(self, key: str) -> bytes: ...
    @abc.abstractmethod
    def _write_bytes(self, key: str, data: bytes) -> None: ...
    @abc.abstractmethod
    def _put_file(self, local_path: str, key: str) -> None: ...
    @abc.abstractmethod
    def _get_file(self, key: str, local_path: str) -> None: ...
    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...
    @abc.abstractmethod
    def _size(self, key: str) -> int: ...
    @abc.abstractmethod
    def _list(self, prefix: str) -> builtins.list[str]: ...
    @abc.abstractmethod
    def _list_dirs(self, prefix: str) -> builtins.list[str]: ...
    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...
    @abc.abstractmethod
    def _delete_prefix(self, prefix: str) -> None: ...
    @abc.abstractmethod
    def _move(self, src: str, dst: str) -> None: ...
    @abc.abstractmethod
    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None: ...
    @abc.abstractmethod
    def _create(self, key: str, data: bytes) -> Version: ...
    @abc.abstractmethod
    def _replace(self, key: str, data: bytes, expected: Version) -> Version: ...
    @abc.abstractmethod
    def _flush(self) -> None: ...


# ---- registry ----------------------------------------------------------------------------

# scheme -> (module, class, packages to install if the import fails)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "file": ("colabjob.storage.local", "LocalStore", ""),
    "memory": ("colabjob.storage.memory", "MemoryStore", ""),
    "drive": ("colabjob.storage.drive", "DriveStore", ""),
    "gs": ("colabjob.storage.gcs", "GCSStore", "gcsfs google-cloud-storage"),
    "gcs": ("colabjob.storage.gcs", "GCSStore", "gcsfs google-cloud-storage"),
    "s3": ("colabjob.storage.s3", "S3Store", "'colabjob[s3]'"),
}


def register_backend(scheme: str, module: str, cls: str, packages: str = "") -> None:
    """Register (or override) the Store class for ``scheme://`` URLs, imported lazily."""
    _BACKENDS[scheme] = (module, cls, packages)


def drive_root() -> str:
    """The Colab Drive mount point (``COLABJOB_DRIVE_ROOT`` overrides it, for tests)."""
    return os.path.abspath(os.environ.get(DRIVE_ROOT_ENV) or DEFAULT_DRIVE_ROOT)


def _scheme(url: str) -> str:
    head, sep, _ = url.partition("://")
    if not sep or len(head) < 2 or not head.replace("+", "").replace("-", "").isalnum():
        return ""  # a plain path (also a Windows drive letter such as C:\)
    return head.lower()


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def open_store(
    url: str | os.PathLike[str], *, retry: RetryPolicy | None = None, **opts: object
) -> Store:
    """Open the Store for ``url``: a local path or ``file://``, a path under the Drive mount
    (``/content/drive/...``), ``gs://bucket/prefix``, ``s3://bucket/prefix`` (an S3-compatible
    service: ``?endpoint_url=https://HOST`` or ``AWS_ENDPOINT_URL``) or ``memory://name``.

    Backend options (``opts``) go to the backend's ``from_url``; ``retry`` overrides the
    retry policy (tests pass one with a no-op ``sleep``).
    """
    text = os.fspath(url)
    if not isinstance(text, str) or not text:
        raise UnsupportedURLError(f"storage URL must be a non-empty string, got {url!r}")
    scheme = _scheme(text)
    if not scheme:
        path = os.path.abspath(os.path.expanduser(text))
        scheme = "drive" if _is_under(path, drive_root()) else "file"
        text = path
    elif scheme == "file":
        from urllib.parse import unquote, urlparse

        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise UnsupportedURLError(
                f"file:// URL with a host is not supported: {text!r}",
                hint="use file:///absolute/path or a plain path",
            )
        text = os.path.abspath(unquote(parsed.path))
        if _is_under(text, drive_root()):
            scheme = "drive"
    if scheme not in _BACKENDS:
        raise UnsupportedURLError(
            f"unsupported storage URL {text!r} (scheme {scheme!r})",
            hint="use a local path, /content/drive/... (Colab Drive), gs://bucket/prefix, "
            "s3://bucket/prefix or memory://name; mount other stores (e.g. gcsfuse, rclone) "
            "and pass the path",
        )
    module_name, cls_name, packages = _BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnsupportedURLError(
            f"{scheme}:// storage needs packages that are not installed ({e})",
            hint=f"pip install {packages}" if packages else "reinstall colabjob",
        ) from e
    cls = getattr(module, cls_name)
    store: Store = cls.from_url(text, retry=retry, **opts)
    return store
