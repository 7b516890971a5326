"""Stores on the Colab Google Drive mount (``/content/drive/...``).

Drive in Colab is a FUSE filesystem with a write-back cache, so a local store is not enough:

* **Mounted?** Every write first checks that the mount is there. After
  ``flush_and_unmount()`` or a dropped mount, ``/content/drive/MyDrive`` is gone and a
  plain ``makedirs`` would silently write to the VM's disk, which dies with the VM; we
  raise ``DriveNotMountedError`` instead ("call google.colab.drive.mount('/content/drive')
  first").
* **Durable?** A closed (even fsynced) file is not yet in Drive: the FUSE daemon uploads it
  later, and large files take minutes. ``flush()`` calls
  ``google.colab.drive.flush_and_unmount()``, the only call that forces the push; it
  unmounts, so call it at the end of a session (after the last checkpoint), and remount
  before writing again. Outside Colab it is a no-op.
* **Complete?** Each write's size is checked after the rename; a mismatch counts as a
  transient EIO and is retried. "Transport endpoint is not connected" (errno 107) mid-run
  is transient too (see ``colabjob.storage.retry``).
* **The trash/quota trap.** Files deleted through the mount go to the Drive trash and keep
  counting against the Drive quota for 30 days. A job that writes a 2 GB checkpoint every
  segment and keeps two can fill a 15 GB free Drive in a few segments although only 4 GB
  are visible. Prefer few large files, keep retention low, and empty the trash
  (drive.google.com → Trash → Empty trash) when ``StorageFullError`` says the quota is
  exceeded.

The mount root defaults to ``/content/drive`` and can be moved with ``COLABJOB_DRIVE_ROOT``
(tests point it at a temporary directory).
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from colabjob.errors import DriveNotMountedError
from colabjob.storage.local import LocalStore
from colabjob.storage.retry import RetryPolicy
from colabjob.storage.store import drive_root

__all__ = ["DriveStore", "in_colab", "is_mounted"]

T = TypeVar("T")

# Entries that exist only while Drive is mounted (the mount point itself stays behind).
_MOUNT_MARKERS = ("MyDrive", "Shareddrives", ".shortcut-targets-by-id", "Othercomputers")


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules


def is_mounted(mount_root: str) -> bool:
    """Whether Google Drive is mounted at ``mount_root``."""
    return any(os.path.isdir(os.path.join(mount_root, m)) for m in _MOUNT_MARKERS)


def _colab_flush_and_unmount() -> None:
    drive = importlib.import_module("google.colab.drive")
    drive.flush_and_unmount()


class DriveStore(LocalStore):
    """A LocalStore under the Drive mount that checks the mount, verifies sizes and flushes
    through Colab."""

    def __init__(
        self,
        root: str,
        *,
        retry: RetryPolicy | None = None,
        mount_root: str | None = None,
        flush_and_unmount: Callable[[], None] | None = None,
        _make: bool = True,
    ) -> None:
        self._mount_root = os.path.abspath(mount_root or drive_root())
        if flush_and_unmount is None and in_colab():
            flush_and_unmount = _colab_flush_and_unmount
        self._flush_and_unmount = flush_and_unmount
        super().__init__(root, retry=retry, _make=_make)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        mount_root: str | None = None,
        flush_and_unmount: Callable[[], None] | None = None,
    ) -> DriveStore:
        return cls(url, retry=retry, mount_root=mount_root, flush_and_unmount=flush_and_unmount)

    def _child(self, prefix: str) -> DriveStore:
        return DriveStore(
            self._path(prefix),
            retry=self.retry_policy,
            mount_root=self._mount_root,
            flush_and_unmount=self._flush_and_unmount,
            _make=False,
        )

    def _check_mount(self) -> None:
        if not is_mounted(self._mount_root):
            raise DriveNotMountedError(
                f"Google Drive is not mounted at {self._mount_root} (needed for {self.url})",
                hint="call google.colab.drive.mount('/content/drive') first "
                "(after flush() unmounted it, mount it again before writing)",
            )

    def _verify(self, path: str, size: int) -> None:
        actual = os.stat(path).st_size
        if actual != size:
            # The FUSE cache lost part of the write: transient, the retry rewrites it.
            raise OSError(errno.EIO, f"size after write is {actual}, expected {size}", path)

    def _call(self, fn: Callable[[], T], key: str = "") -> T:
        # Every operation, reads and listings included: on an unmounted Drive an empty
        # listing would look like "no checkpoint yet" and restart the job from scratch.
        def checked() -> T:
            self._check_mount()
            return fn()

        return super()._call(checked, key)

    def flush(self) -> None:
        """Push everything to Drive (Colab: ``flush_and_unmount``, which unmounts)."""
        self.retry_policy.call(self._flush, target=self.url)

    def _flush(self) -> None:
        if hasattr(os, "sync"):
            os.sync()
        if self._flush_and_unmount is not None:
            self._flush_and_unmount()
