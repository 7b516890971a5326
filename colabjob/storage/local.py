"""Local-filesystem stores (plain paths and ``file://``), the base of the Drive store.

Every write is atomic and durable: the bytes go to a temp file in the destination directory
(``.colabjob-tmp-*``, never listed), which is fsynced, renamed over the target with
``os.replace`` and followed by an fsync of the directory. Control objects add preconditions
that hold across processes: the writer takes an exclusive ``flock`` on the object's
directory (no lock files to leak), create-only links the temp file into place with
``os.link`` (which refuses an existing target), and compare-and-swap compares the current
version token — inode, mtime, size and a sha256 of the bytes — before ``os.replace``.
Deleting the last object of a directory removes the empty directories above it, so a
"directory" exists exactly while it holds an object, as on an object store.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any

from colabjob.errors import AlreadyExistsError, PreconditionFailedError, StoragePermissionError
from colabjob.storage.retry import RetryPolicy
from colabjob.storage.store import RESERVED_PREFIX, Store, Version, check_key

__all__ = ["LocalStore", "atomic_local_fetch", "atomic_local_write"]

TMP_PREFIX = RESERVED_PREFIX + "tmp-"
_COPY_CHUNK = 8 << 20
_NO_LINK = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS})


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable. Filesystems that cannot fsync a directory
    (some FUSE mounts) are tolerated: their renames are as durable as they get."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_temp(directory: str, writer: Callable[[IO[bytes]], Any]) -> str:
    """Write a fsynced temp file in ``directory`` (created if needed); return its path."""
    for _ in range(5):
        os.makedirs(directory, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX)
        except FileNotFoundError:  # an empty-directory prune raced us; make it again
            continue
        break
    else:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return tmp


def atomic_local_write(path: str, writer: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` atomically: temp file, fsync, ``os.replace``, fsync of the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = write_temp(directory, writer)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    fsync_dir(directory)


def atomic_local_fetch(path: str, fetch: Callable[[str], Any]) -> None:
    """Like ``atomic_local_write`` for a downloader that writes to a path: ``fetch(tmp)``."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = write_temp(directory, lambda f: None)
    try:
        fetch(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    fsync_dir(directory)


def _unlink_quiet(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)


@contextmanager
def dir_lock(directory: str) -> Iterator[None]:
    """Exclusive, cross-process lock on ``directory`` (released when the fd closes)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _token(st: os.stat_result, data: bytes) -> Version:
    digest = hashlib.sha256(data).hexdigest()[:32]
    return Version(token=f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}-{digest}")


def _read_with_stat(path: str) -> tuple[bytes, os.stat_result] | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), st
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _copy_from(src: str) -> Callable[[IO[bytes]], None]:
    def writer(out: IO[bytes]) -> None:
        with open(src, "rb") as f:
            out.flush()
            try:
                # In-kernel copy: several times faster than a read/write loop for the large
                # files of a checkpoint, and it keeps commit time near a plain `cp`.
                size = os.fstat(f.fileno()).st_size
                offset = 0
                while offset < size:
                    sent = os.sendfile(out.fileno(), f.fileno(), offset, size - offset)
                    if sent == 0:
                        break
                    offset += sent
                out.seek(offset)
                if offset == size:
                    return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
            f.seek(out.tell())
            shutil.copyfileobj(f, out, _COPY_CHUNK)

    return writer


class LocalStore(Store):
    """A Store in a local directory. Safe across threads and processes on one machine."""

    def __init__(self, root: str, *, retry: RetryPolicy | None = None, _make: bool = True) -> None:
        path = os.path.abspath(os.path.expanduser(root))
        super().__init__(path, retry=retry)
        self._root = path
        if _make:
            self._call(self._make_root)

    @classmethod
    def from_url(cls, url: str, *, retry: RetryPolicy | None = None) -> LocalStore:
        return cls(url, retry=retry)

    def _make_root(self) -> None:
        if os.path.isdir(self._root):
            # An existing root may be read-only (a read-only mount, a shared results dir):
            # `status`, `ls`, `logs` and `plot` only read. A command that writes fails on its
            # first write with StoragePermissionError (EROFS/EACCES), before changing anything.
            return
        try:
            os.makedirs(self._root, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise StoragePermissionError(
                f"cannot use {self._root} as a storage root: {e.strerror} ({e.filename})",
                hint="a parent of this path is a regular file; choose a directory path",
            ) from e
        except PermissionError as e:
            raise StoragePermissionError(
                f"cannot create storage root {self._root}: {e.strerror}",
                hint="choose a location you can write to",
            ) from e
        if not os.access(self._root, os.W_OK | os.X_OK):
            raise StoragePermissionError(
                f"storage root {self._root} is not writable",
                hint="fix its permissions or choose a location you can write to",
            )

    def _verify(self, path: str, size: int) -> None:
        """Check a finished write (Drive overrides this)."""

    def _child(self, prefix: str) -> Store:
        return type(self)(self._path(prefix), retry=self.retry_policy, _make=False)

    def _path(self, key: str) -> str:
        return os.path.join(self._root, *key.split("/")) if key else self._root

    def fsspec_target(self, key: str) -> tuple[object, str] | None:
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(auto_mkdir=True), self._path(check_key(key))

    # ---- bulk objects -----------------------------------------------------------------

    def _read_bytes(self, key: str) -> bytes:
        got = _read_with_stat(self._path(key))
        if got is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self._path(key))
        return got[0]

    def _write(self, key: str, writer: Callable[[IO[bytes]], Any], size: int | None) -> None:
        path = self._path(key)
        atomic_local_write(path, writer)
        if size is not None:
            self._verify(path, size)

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data), len(data))

    def _put_file(self, local_path: str, key: str) -> None:
        self._write(key, _copy_from(local_path), os.path.getsize(local_path))

    def _get_file(self, key: str, local_path: str) -> None:
        src = self._path(key)
        if not os.path.isfile(src):
            raise FileNotFoundError(errno.ENOENT, "no such object", src)
        atomic_local_write(local_path, _copy_from(src))

    def _exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def _size(self, key: str) -> int:
        st = os.stat(self._path(key))
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "no such object", self._path(key))
        return st.st_size

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
            rel = os.path.relpath(dirpath, self._root)
            parts = [] if rel == "." else rel.split(os.sep)
            keys.extend(
                "/".join([*parts, f]) for f in filenames if not f.startswith(RESERVED_PREFIX)
            )
        return keys

    def _list_dirs(self, prefix: str) -> list[str]:
        try:
            entries = list(os.scandir(self._path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [
            e.name
            for e in entries
            if e.is_dir() and not e.name.startswith(RESERVED_PREFIX) and _holds_file(e.path)
        ]

    def _delete(self, key: str) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            with dir_lock(directory):
                os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        self._prune(directory)

    def _delete_prefix(self, prefix: str) -> None:
        base = self._path(prefix)
        if not prefix:
            for entry in os.scandir(base):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=False)
                else:
                    _unlink_quiet(entry.path)
            return
        try:
            shutil.rmtree(base)
        except (FileNotFoundError, NotADirectoryError):
            return
        self._prune(os.path.dirname(base))

    def _move(self, src: str, dst: str) -> None:
        s, d = self._path(src), self._path(dst)
        if not os.path.isfile(s):
            raise FileNotFoundError(errno.ENOENT, "no such object", s)
        for _ in range(5):
            os.makedirs(os.path.dirname(d), exist_ok=True)
            try:
                os.replace(s, d)
            except FileNotFoundError:
                if not os.path.isfile(s):
                    raise
                continue  # the destination directory was pruned under us
            break
        fsync_dir(os.path.dirname(d))
        self._verify(d, os.path.getsize(d))
        self._prune(os.path.dirname(s))

    def _prune(self, directory: str) -> None:
        """Remove now-empty directories from ``directory`` up to (not including) the root."""
        root = self._root
        while directory != root and directory.startswith(root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)

    # ---- control objects --------------------------------------------------------------

    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        got = _read_with_stat(self._path(key))
        if got is None:
            return None
        data, st = got
        return data, _token(st, data)

    def _create(self, key: str, data: bytes) -> Version:
        path = self._path(key)
        directory = os.path.dirname(path)
        tmp = write_temp(directory, lambda f: f.write(data))
        try:
            with dir_lock(directory):
                self._link_new(tmp, path, key)
                version = _token(os.stat(path), data)
                self._verify(path, len(data))  # under the lock: no other writer's bytes yet
        finally:
            _unlink_quiet(tmp)
        fsync_dir(directory)
        return version

    def _link_new(self, tmp: str, path: str, key: str) -> None:
        try:
            os.link(tmp, path)
        except FileExistsError as e:
            raise AlreadyExistsError(f"{self.url_of(key)} already exists") from e
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
            # No hard links here (some FUSE mounts): the directory lock we hold makes
            # check-then-rename safe against every other colabjob writer.
            if os.path.lexists(path):
                raise AlreadyExistsError(f"{self.url_of(key)} already exists") from e
            os.replace(tmp, path)

    def _replace(self, key: str, data: bytes, expected: Version) -> Version:
        path = self._path(key)
        directory = os.path.dirname(path)
        if not os.path.isfile(path):  # checked first: writing the temp file would recreate
            # the directories of a job that was deleted
            raise PreconditionFailedError(f"{self.url_of(key)} no longer exists")
        tmp = write_temp(directory, lambda f: f.write(data))
        try:
            with dir_lock(directory):
                current = self._read_versioned(key)
                if current is None:
                    raise PreconditionFailedError(f"{self.url_of(key)} no longer exists")
                if current[1] != expected:
                    raise PreconditionFailedError(
                        f"{self.url_of(key)} changed since it was read (compare-and-swap lost)"
                    )
                os.replace(tmp, path)
                version = _token(os.stat(path), data)
                # Under the lock: checked after it, a concurrent writer's update of another
                # size looked like a lost write here, and the retried swap, refused, made the
                # caller apply its update twice.
                self._verify(path, len(data))
        finally:
            _unlink_quiet(tmp)
        fsync_dir(directory)
        return version

    def _flush(self) -> None:
        pass  # every write was fsynced before it returned


def _holds_file(directory: str) -> bool:
    for _dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
        if any(not f.startswith(RESERVED_PREFIX) for f in filenames):
            return True
    return False
