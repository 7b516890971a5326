"""Moving a job: Drive (or S3) → GCS copy verified by hash, refusal of corrupt files, the moved
marker.

The source is a real ``DriveStore`` on a stand-in mount (``COLABJOB_DRIVE_ROOT`` → a temp
dir) holding checkpoints committed by ``CheckpointStore``; the destination is the GCS
emulator (or ``memory://`` for the cases that only exercise our own logic).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from colabjob.errors import (
    AlreadyExistsError,
    CheckpointError,
    CorruptCheckpointError,
    JobMovedError,
)
from colabjob.runner.handoff.transfer import (
    MOVED_KEY,
    MovedMarker,
    check_not_moved,
    copy_job,
    mark_moved,
    read_moved,
)
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import LEASE_KEY, Holder
from colabjob.runner.record import RECORD_KEY, create_record, load_record
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.drive import DriveStore
from colabjob.storage.memory import MemoryStore
from colabjob.storage.store import Store, open_store
from tests.fakes import FakeClock
from tests.storage.ckpt_helpers import files_for

STEPS = (10, 20, 30)


@pytest.fixture
def drive_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    root = tmp_path / "drive"
    (root / "MyDrive").mkdir(parents=True)
    monkeypatch.setenv("COLABJOB_DRIVE_ROOT", str(root))
    store = open_store(str(root / "MyDrive" / "jobs" / "run1"))
    assert isinstance(store, DriveStore)
    make_job(store)
    return store


def memory_store() -> Store:
    return open_store(f"memory://{uuid.uuid4().hex}/job")


def make_job(store: Store, config: dict[str, Any] | None = None) -> None:
    config = config or {"job": {"name": "run1", "kind": "scratch"}}
    create_record(store, job_id="run1", config=config)
    lease = Lease(store, holder=Holder(host="colab", platform="colab", pid=1, session_id="s1"))
    lease.acquire()
    ckpts = CheckpointStore(store, keep=3, fence=lease.current_epoch)
    for step in STEPS:
        ckpts.save(step, files_for(step), epoch=lease.epoch)
    lease.release()
    store.write_bytes("metrics/metrics.jsonl", b'{"step": 30, "loss": 1.5}\n')
    store.write_bytes("control/stop.json", b"{}")  # control objects stay behind


def dirname_of(store: Store, step: int) -> str:
    (info,) = [i for i in CheckpointStore(store).list() if i.step == step]
    return info.dirname


@pytest.mark.gcs
def test_a_drive_job_is_copied_to_gcs_and_verified(drive_job: Store, gcs_bucket: str) -> None:
    dst = open_store(gcs_bucket)
    report = copy_job(drive_job, dst, clock=FakeClock())
    assert (report.copied, report.already_there, report.refused) == (STEPS, (), ())
    assert report.other_files == 1 and report.latest_step == 30
    src_ckpts, dst_ckpts = CheckpointStore(drive_job), CheckpointStore(dst)
    assert [i.step for i in dst_ckpts.list()] == list(STEPS)
    for info in src_ckpts.list():
        key = info.key("manifest.json")
        assert dst.read_bytes(key) == drive_job.read_bytes(key)  # byte for byte
    latest = dst_ckpts.latest(verify="full")
    assert latest is not None and latest.step == 30
    for name, data in files_for(30).items():
        assert dst_ckpts.read(latest, name) == data
    record = load_record(dst)
    assert record.job_id == "run1" and record.extras["moved_from"] == drive_job.url
    assert record.epoch == load_record(drive_job).epoch  # the fence continues upwards
    assert dst.read_bytes("metrics/metrics.jsonl") == drive_job.read_bytes("metrics/metrics.jsonl")
    assert not [k for k in dst.list() if k.startswith("control/")]
    assert read_moved(drive_job) is None  # marking is the caller's next step


@pytest.mark.gcs
@pytest.mark.s3
def test_an_s3_job_is_copied_to_gcs_and_the_s3_copy_refuses_to_run(
    s3_bucket: str, gcs_bucket: str
) -> None:
    """The handoff's copy from S3 (the VM reaches only GCS): verified, then marked moved."""
    src, dst = open_store(s3_bucket), open_store(gcs_bucket)
    make_job(src)
    report = copy_job(src, dst, clock=FakeClock())
    assert (report.copied, report.refused) == (STEPS, ())
    latest = CheckpointStore(dst).latest(verify="full")
    assert latest is not None and latest.step == 30
    assert load_record(dst).extras["moved_from"] == src.url
    mark_moved(src, MovedMarker(moved_to=dst.url, moved_at=1_700_000_000.0, last_step=30))
    with pytest.raises(JobMovedError, match=f"moved to {dst.url}"):
        check_not_moved(src, load_record(src))


@pytest.mark.gcs
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupted_source_file_is_refused(
    drive_job: Store, gcs_bucket: str, damage: str
) -> None:
    bad = dirname_of(drive_job, 30)
    key = f"ckpt/{bad}/model.bin"
    data = drive_job.read_bytes(key)
    if damage == "flip":
        drive_job.write_bytes(key, bytes([data[0] ^ 1]) + data[1:])  # same size
    elif damage == "truncate":
        drive_job.write_bytes(key, data[:-10])
    else:
        drive_job.delete(key)
    dst = open_store(gcs_bucket)
    report = copy_job(drive_job, dst)
    assert report.copied == (10, 20)
    ((dirname, problem),) = report.refused
    assert dirname == bad
    expected = {"flip": "sha256 mismatch", "truncate": "size", "delete": "missing"}[damage]
    assert expected in problem and "model.bin" in problem
    assert dst.list(f"ckpt/{bad}") == []  # nothing of it, not even the good file
    latest = CheckpointStore(dst).latest(verify="full")
    assert latest is not None and latest.step == 20


def test_nothing_moves_when_no_checkpoint_verifies() -> None:
    src, dst = memory_store(), memory_store()
    make_job(src)
    for step in STEPS:
        key = f"ckpt/{dirname_of(src, step)}/sub/opt.bin"
        src.write_bytes(key, b"x" * src.size(key))
    with pytest.raises(CorruptCheckpointError, match="nothing was moved"):
        copy_job(src, dst)
    assert not dst.exists(RECORD_KEY)
    assert dst.list("ckpt") == []


class ShortUploads(MemoryStore):
    """A destination that silently loses the last byte of every uploaded file."""

    def _put_file(self, local_path: str, key: str) -> None:
        self._write_bytes(key, Path(local_path).read_bytes()[:-1])


def test_a_damaged_upload_is_caught_and_removed() -> None:
    src = memory_store()
    make_job(src)
    dst = ShortUploads(uuid.uuid4().hex)
    with pytest.raises(CorruptCheckpointError):
        copy_job(src, dst)
    assert dst.list("ckpt") == [] and not dst.exists(RECORD_KEY)


def test_an_interrupted_copy_resumes() -> None:
    src, dst = memory_store(), memory_store()
    make_job(src)
    copy_job(src, dst)
    # as if the first run died after two checkpoints: the third uncommitted, no record
    dst.delete(RECORD_KEY)
    dst.delete(f"ckpt/{dirname_of(src, 30)}/manifest.json")
    report = copy_job(src, dst)
    assert (report.copied, report.already_there) == ((30,), (10, 20))
    assert load_record(dst).extras["moved_from"] == src.url
    again = copy_job(src, dst)  # and once more, complete: nothing to do but the small files
    assert (again.copied, again.already_there) == ((), STEPS)


def test_a_destination_holding_another_job_is_refused() -> None:
    src, dst = memory_store(), memory_store()
    make_job(src)
    create_record(dst, job_id="other", config={})
    with pytest.raises(AlreadyExistsError, match="already holds job other"):
        copy_job(src, dst)


def test_a_conflicting_checkpoint_at_the_destination_is_refused() -> None:
    src, dst = memory_store(), memory_store()
    make_job(src)
    dst.write_bytes(f"ckpt/{dirname_of(src, 10)}/manifest.json", b"{}")
    with pytest.raises(CheckpointError, match="different content"):
        copy_job(src, dst)


def test_the_old_location_refuses_to_run_and_points_to_the_new_one() -> None:
    src = memory_store()
    make_job(src)
    check_not_moved(src)  # not moved yet
    marker = MovedMarker(moved_to="gs://bucket/jobs/run1", moved_at=1_700_000_000.0, last_step=30)
    record = mark_moved(src, marker)
    assert record.extras["moved_to"] == "gs://bucket/jobs/run1"
    assert read_moved(src) == marker
    with pytest.raises(JobMovedError) as info:
        check_not_moved(src)
    err = info.value
    assert err.moved_to == "gs://bucket/jobs/run1" and err.exit_code == 2
    assert "moved to gs://bucket/jobs/run1 at 2023-11-14" in str(err)
    assert "colabjob resume gs://bucket/jobs/run1" in str(err)
    # the record alone still refuses (someone deleted the marker by hand)
    src.delete(MOVED_KEY)
    with pytest.raises(JobMovedError):
        check_not_moved(src, load_record(src))
    # an unreadable marker refuses too: running twice is worse than asking
    src.write_bytes(MOVED_KEY, b"not json")
    with pytest.raises(JobMovedError, match="unreadable"):
        check_not_moved(src)


def test_the_lease_is_not_copied() -> None:
    src, dst = memory_store(), memory_store()
    make_job(src)
    assert src.exists(LEASE_KEY)
    copy_job(src, dst)
    assert not dst.exists(LEASE_KEY) and not dst.exists("control/stop.json")


@pytest.mark.slow
def test_the_cli_refuses_to_resume_a_moved_job(tmp_path: Path) -> None:
    from tests.cli.builders import CONFIG, run_cli

    store = open_store(str(tmp_path / "job"))
    make_job(store, config=CONFIG)  # a valid spec: only the move can stop the resume
    mark_moved(store, MovedMarker(moved_to="gs://bucket/jobs/run1", moved_at=1_700_000_000.0))
    out = run_cli("resume", str(tmp_path / "job"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "moved to gs://bucket/jobs/run1" in out.stderr
    assert "colabjob resume gs://bucket/jobs/run1" in out.stderr
    assert load_record(store).history == ()  # no segment was started at the old location
