"""A segment whose storage fails under it (Session API, real local files): a disk that fills
up mid-run stops training after a bounded number of failed checkpoints, ends the segment
FAILED and releases the lease, so the fixed job resumes at once; a job directory deleted
mid-run stops the runner with "storage disappeared" and is not recreated."""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Any

import pytest

import colabjob
from colabjob.errors import StorageError, StorageLostError
from colabjob.jobs.checkpointing.failures import MAX_FAILED_CHECKPOINTS
from colabjob.runner.lease.info import read_lease
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage import open_store
from tests.jobs.helpers import train_tiny
from tests.storage.flaky import FlakyStore

KW: dict[str, Any] = {
    "platform": "local",
    "every_steps": 2,
    "every_minutes": None,
    "max_steps": 60,
    "tensorboard": False,
}


def settle(s: Any) -> None:
    """Wait for the background commit in flight, so each step boundary sees how it ended (a
    tiny CPU model would otherwise outrun the upload thread to the end of the job)."""
    pending = s.ctx.checkpoints.pending
    if pending is not None:
        with contextlib.suppress(Exception):  # its failure is the Session's to handle
            pending.wait()


def test_a_full_disk_stops_training_and_releases_the_lease(tmp_path: Path) -> None:
    inner = open_store(str(tmp_path / "job"))
    disk = FlakyStore(inner, rate=0.0)
    lines: list[str] = []

    def fill_the_disk(s: Any) -> None:
        settle(s)
        if s.global_step == 3:
            s.save(final=True)  # step 3 is committed; from now on checkpoint files fail
            disk.only = {"put_file", "write_bytes"}
            disk.permanent = OSError(errno.ENOSPC, "No space left on device")

    with (
        pytest.raises(StorageError) as e,
        colabjob.session(disk, log=lines.append, **KW) as s,
    ):
        train_tiny(s, after=fill_the_disk)
    text = str(e.value)
    assert f"{MAX_FAILED_CHECKPOINTS} checkpoints in a row failed" in text
    assert "disk full, read-only or unreachable" in text and "work since step 3" in text
    assert e.value.exit_code == 1
    assert sum("retrying at the next one" in line for line in lines) == MAX_FAILED_CHECKPOINTS - 1
    assert s.global_step < 60  # stopped, not trained to the end unsaved
    got = read_lease(inner)
    assert got is not None and got[0].released  # the fixed job is not refused
    record = load_record(inner)
    assert record.state is JobState.FAILED and "checkpoints in a row failed" in (
        record.history[-1].error or ""
    )

    with colabjob.session(inner, log=None, **KW) as again:  # space freed: resume at once
        assert again.global_step == 0
        train_tiny(again)
    assert again.first_step == 3 and again.outcome is not None and again.outcome.completed


def test_a_deleted_job_directory_stops_the_runner_and_stays_deleted(tmp_path: Path) -> None:
    root = tmp_path / "job"
    lines: list[str] = []

    def delete_the_job(s: Any) -> None:
        settle(s)
        if s.global_step == 5:
            s.save(final=True)  # nothing in flight: the next commit starts after the rm
            shutil.rmtree(root)

    with (
        pytest.raises(StorageLostError) as e,
        colabjob.session(str(root), log=lines.append, **KW) as s,
    ):
        train_tiny(s, after=delete_the_job)
    assert "the job's storage disappeared" in str(e.value) and "job.json" in str(e.value)
    assert s.global_step == 7  # the first commit after the rm (step 6) stopped it
    assert any("writes nothing more there" in line for line in lines)
    assert not root.exists()  # no ckpt/, no job.json, no lease recreated
