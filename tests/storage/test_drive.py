"""The Drive store on a stand-in mount (``COLABJOB_DRIVE_ROOT`` pointed at a temp dir): it is
picked for paths under the mount, refuses to run once the mount is gone (instead of writing to
the VM's disk or reporting an empty listing), verifies sizes and flushes through Colab."""

from __future__ import annotations

import fcntl
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from colabjob.errors import DriveNotMountedError
from colabjob.storage import local, open_store
from colabjob.storage.drive import DriveStore
from colabjob.storage.retry import RetryPolicy
from tests.storage.contract import SharedStoreContract


@pytest.fixture
def mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "drive"
    (root / "MyDrive").mkdir(parents=True)
    monkeypatch.setenv("COLABJOB_DRIVE_ROOT", str(root))
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    return root


def test_a_write_is_verified_before_other_writers_may_change_it(
    mount: Path, fast_retry: RetryPolicy
) -> None:
    """The size check after a create or a compare-and-swap runs while the object's directory
    lock is held. Checked after it, a concurrent writer's value of another size ("9" -> "10")
    looked like a lost write: the retried swap was refused and the caller's increment was
    applied twice (seen as 33 of 32 in the threads race of the contract suite)."""
    held: list[bool] = []

    class Probe(DriveStore):
        def _verify(self, path: str, size: int) -> None:
            fd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)  # nobody holds the lock: another writer could be in
            except BlockingIOError:
                held.append(True)
            finally:
                os.close(fd)
            super()._verify(path, size)

    store = Probe(str(mount / "MyDrive" / "jobs"), retry=fast_retry)
    version = store.create("ctl/counter", b"9")
    store.replace("ctl/counter", b"10", version)
    assert held == [True, True]
    assert store.read_bytes("ctl/counter") == b"10"


def test_paths_under_the_mount_open_a_drive_store(mount: Path, fast_retry: RetryPolicy) -> None:
    store = open_store(str(mount / "MyDrive" / "jobs"), retry=fast_retry)
    assert isinstance(store, DriveStore)
    assert isinstance(open_store(f"file://{mount}/MyDrive/x"), DriveStore)
    store.write_bytes("j/a", b"1")
    assert isinstance(store.child("j"), DriveStore)
    assert store.child("j").read_bytes("a") == b"1"
    assert (mount / "MyDrive" / "jobs" / "j" / "a").read_bytes() == b"1"


def test_a_vanished_mount_stops_every_operation(mount: Path, fast_retry: RetryPolicy) -> None:
    store = open_store(str(mount / "MyDrive" / "jobs"), retry=fast_retry)
    store.write_bytes("ckpt/a", b"1")
    (mount / "MyDrive").rename(mount / "elsewhere")  # what flush_and_unmount leaves behind
    for op in (
        lambda: store.write_bytes("ckpt/b", b"2"),
        lambda: store.read_bytes("ckpt/a"),
        lambda: store.list(),  # an empty listing would look like "no checkpoint yet"
        lambda: store.list_dirs(),
        lambda: store.read_versioned("ckpt/a"),
        lambda: store.create("ctl", b"x"),
    ):
        with pytest.raises(DriveNotMountedError):
            op()
    assert not (mount / "MyDrive").exists()


def test_flush_calls_flush_and_unmount(mount: Path, fast_retry: RetryPolicy) -> None:
    calls: list[str] = []
    store = open_store(
        str(mount / "MyDrive" / "j"), retry=fast_retry, flush_and_unmount=lambda: calls.append("f")
    )
    store.write_bytes("k", b"v")
    store.flush()
    store.child("sub").flush()
    assert calls == ["f", "f"]


def test_flush_outside_colab_is_a_no_op(mount: Path) -> None:
    open_store(str(mount / "MyDrive" / "j")).flush()


def test_flush_in_colab_uses_google_colab_drive(
    mount: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    fake = types.ModuleType("google.colab.drive")
    fake.flush_and_unmount = lambda: calls.append("flushed")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google.colab.drive", fake)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-test")
    open_store(str(mount / "MyDrive" / "j")).flush()
    assert calls == ["flushed"]


def test_short_write_is_detected_and_rewritten(
    mount: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSE lost the tail of the first write: the size check catches it, the retry rewrites."""
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=3, sleep=sleeps.append)
    store = open_store(str(mount / "MyDrive" / "j"), retry=policy)
    real = local.atomic_local_write
    writes = 0

    def truncating(path: str, writer: Callable[[IO[bytes]], Any]) -> None:
        nonlocal writes
        writes += 1
        real(path, writer)
        if writes == 1:
            with open(path, "r+b") as f:
                f.truncate(3)

    monkeypatch.setattr(local, "atomic_local_write", truncating)
    store.write_bytes("big", b"0123456789")
    assert writes == 2 and len(sleeps) == 1
    assert store.read_bytes("big") == b"0123456789"


def test_drive_store_honours_the_contract_basics(mount: Path, fast_retry: RetryPolicy) -> None:
    store = open_store(str(mount / "MyDrive" / "j"), retry=fast_retry)
    v1 = store.create("ctl/lease", b"1")
    store.replace("ctl/lease", b"2", v1)
    store.write_bytes("ckpt/1/w", b"w")
    store.move("ckpt/1/w", "ckpt/2/w")
    assert store.list() == ["ckpt/2/w", "ctl/lease"]
    assert store.list_dirs("ckpt") == ["2"]


class TestDriveStoreContract(SharedStoreContract):
    """The whole Store contract on the Drive store (stand-in mount); child processes inherit
    ``COLABJOB_DRIVE_ROOT`` from the environment, so they open the same Drive store."""

    @pytest.fixture
    def store_url(self, mount: Path) -> str:
        url = str(mount / "MyDrive" / "jobs")
        assert isinstance(open_store(url), DriveStore)
        return url
