"""Bad input meets a clear ``ColabJobError`` that says what to do: an unknown URL scheme, a
missing backend package, an unmounted Drive, a missing bucket, an unwritable path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from colabjob.errors import (
    BucketNotFoundError,
    ColabJobError,
    ConfigError,
    DriveNotMountedError,
    StorageError,
    StoragePermissionError,
    UnsupportedURLError,
)
from colabjob.storage import open_store
from colabjob.storage import store as store_module
from colabjob.storage.retry import RetryPolicy


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "hf://datasets/x", "https://example.com/x", "azure://c"]
)
def test_unknown_scheme_is_rejected_with_a_hint(url: str) -> None:
    with pytest.raises(UnsupportedURLError) as info:
        open_store(url)
    err = info.value
    assert isinstance(err, ConfigError) and err.exit_code == 2
    assert err.hint is not None and "gs://" in err.hint and "memory://" in err.hint
    assert "s3://" in err.hint


@pytest.mark.parametrize(
    "url", ["", "file://otherhost/tmp/x", "gs://", "gs:///x", "memory://", "s3://", "s3:///x"]
)
def test_malformed_urls_are_rejected(url: str) -> None:
    with pytest.raises(UnsupportedURLError):
        open_store(url)


def test_missing_backend_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        store_module._BACKENDS, "fake", ("colabjob.storage.no_such_backend", "X", "fake-pkg")
    )
    with pytest.raises(UnsupportedURLError) as info:
        open_store("fake://x")
    assert info.value.hint == "pip install fake-pkg"


def test_backends_are_imported_only_when_used() -> None:
    code = (
        "import sys; from colabjob.storage import open_store; open_store('memory://x');"
        "print(sorted(m for m in ('gcsfs', 'google.cloud.storage', 's3fs', 'botocore', 'torch')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_file_urls_and_relative_paths_are_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(f"file://{tmp_path}/a")
    assert store.url == str(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    assert open_store("a").url == str(tmp_path / "a")


def test_unmounted_drive_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mount = tmp_path / "drive"
    mount.mkdir()  # the mount point exists, but nothing is mounted on it
    monkeypatch.setenv("COLABJOB_DRIVE_ROOT", str(mount))
    with pytest.raises(DriveNotMountedError) as info:
        open_store(str(mount / "MyDrive" / "jobs"))
    assert "drive.mount('/content/drive')" in str(info.value)
    assert not (mount / "MyDrive").exists(), "nothing may be written to the VM's own disk"


def test_default_drive_root_is_colab_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLABJOB_DRIVE_ROOT", raising=False)
    if Path("/content/drive/MyDrive").is_dir():
        pytest.skip("a real Drive is mounted here")  # pragma: no cover - only inside Colab
    with pytest.raises(DriveNotMountedError):
        open_store("/content/drive/MyDrive/colabjob")


def test_missing_bucket(gcs_emulator: str) -> None:
    with pytest.raises(BucketNotFoundError) as info:
        open_store("gs://no-such-bucket-here/jobs")
    assert "gcloud storage buckets create gs://no-such-bucket-here" in str(info.value)


def test_bucket_root_opens(gcs_emulator: str) -> None:
    store = open_store("gs://test-bucket/")
    assert store.url == "gs://test-bucket"
    assert store.child("x/y").url == "gs://test-bucket/x/y"


def test_root_under_a_regular_file_is_unwritable(tmp_path: Path) -> None:
    # Tests run as root, which ignores permission bits: a path whose parent is a regular
    # file fails for every user.
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoragePermissionError) as info:
        open_store(str(tmp_path / "file" / "jobs"))
    assert info.value.hint
    with pytest.raises(StoragePermissionError):
        open_store(str(tmp_path / "file"))


def test_key_under_an_object_fails_clearly(tmp_path: Path, fast_retry: RetryPolicy) -> None:
    store = open_store(str(tmp_path / "s"), retry=fast_retry)
    store.write_bytes("obj", b"x")
    with pytest.raises(StorageError, match="obj/inner"):
        store.write_bytes("obj/inner", b"y")


def test_every_storage_error_is_a_colabjob_error() -> None:
    classes = (
        UnsupportedURLError,
        DriveNotMountedError,
        BucketNotFoundError,
        StoragePermissionError,
    )
    for cls in classes:
        assert issubclass(cls, StorageError) and issubclass(cls, ColabJobError)
