"""Crash consistency: SIGKILL a real child process at every file operation of a save.

The child (``crash_writer.py``) counts each file operation of one save and kills itself
just before operation ``KILL_AT=N``. For N = 1, 2, ... until a save completes without
reaching N, on a store that already holds two checkpoints (so retention runs too):

* ``latest()`` is the previous complete checkpoint or the new complete one, never a part;
* every listed checkpoint reads back whole, each file checked against its sha256 and
  against the bytes the writer meant to write; no corruption is ever reported;
* a new save then succeeds without any manual cleanup, and leaves no orphan prefix behind.

The local run kills inside each atomic write too (temp file, half-written bytes, fsync,
rename, directory fsync); the GCS and S3 emulator runs kill between backend calls.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from colabjob.storage import Store, open_store
from colabjob.storage.catalog import CorruptCheckpointWarning
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.retry import RetryPolicy
from tests.storage.crash_writer import expected_files

WRITER = Path(__file__).with_name("crash_writer.py")
REPO = Path(__file__).resolve().parents[2]
NEW_STEP = 3


def run_writer(
    url: str, mode: str, kill_at: int | None, staging: Path
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STAGING_DIR": str(staging), "PYTHONPATH": str(REPO)}
    env.pop("KILL_AT", None)
    if kill_at is not None:
        env["KILL_AT"] = str(kill_at)
    return subprocess.run(
        [sys.executable, str(WRITER), url, str(NEW_STEP), mode],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_consistent(store: Store) -> int:
    """The invariants after a kill; returns the step ``latest()`` gives."""
    ckpts = CheckpointStore(store)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCheckpointWarning)  # a kill is not corruption
        latest = ckpts.latest(verify="full")
        listed = ckpts.list()
    assert latest is not None and latest.step in (NEW_STEP - 1, NEW_STEP)
    assert latest == listed[-1]
    assert {i.step for i in listed} <= {1, 2, NEW_STEP}
    for info in listed:
        assert set(info.files) == set(expected_files(info.step))
        for name, data in expected_files(info.step).items():
            assert ckpts.read(info, name) == data  # read() checks size + sha256 itself
    return latest.step


def check_recovers(store: Store) -> None:
    """A fresh save works with no cleanup, and housekeeping leaves exactly the kept ones."""
    ckpts = CheckpointStore(store, keep=2)
    info = ckpts.save(NEW_STEP + 1, expected_files(NEW_STEP + 1))
    listed = ckpts.list()
    assert listed[-1] == info and len(listed) == 2
    dirs = {k.split("/")[1] for k in store.list("ckpt")}
    assert dirs == {i.dirname for i in listed}, "an orphan prefix was left behind"


def kill_every_operation(
    mode: str,
    fresh_store: Callable[[], tuple[str, Store]],
    staging: Path,
) -> tuple[int, dict[int, int]]:
    """Kill at N = 1, 2, ... until the save completes; return (kill points, latest-step counts)."""
    seen: dict[int, int] = {}
    n = 0
    while True:
        n += 1
        url, store = fresh_store()
        proc = run_writer(url, mode, n, staging)
        if proc.returncode == 0:
            assert proc.stdout.split()[-2:] == ["OPS", str(n - 1)], proc.stdout
            assert check_consistent(store) == NEW_STEP
            check_recovers(store)
            return n - 1, seen
        assert proc.returncode == -signal.SIGKILL, (n, proc.returncode, proc.stderr[-3000:])
        step = check_consistent(store)
        seen[step] = seen.get(step, 0) + 1
        check_recovers(store)
        assert n < 500, "the save never completes"


def seed(store: Store) -> None:
    ckpts = CheckpointStore(store, keep=2)
    for step in (1, 2):
        ckpts.save(step, expected_files(step))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_at_every_local_file_operation(
    mode: str, tmp_path: Path, fast_retry: RetryPolicy
) -> None:
    template = tmp_path / "template"
    seed(open_store(str(template)))
    staging = tmp_path / "staging"
    runs = iter(range(10_000))

    def fresh() -> tuple[str, Store]:
        root = tmp_path / f"run{next(runs)}"
        shutil.copytree(template, root)
        return str(root), open_store(str(root), retry=fast_retry)

    kills, seen = kill_every_operation(mode, fresh, staging)
    print(f"\nlocal/{mode}: {kills} kill points; latest() after a kill: {seen}")
    assert kills >= 30  # every temp file, half-write, fsync, rename, delete of the save
    assert seen.get(NEW_STEP - 1) and seen.get(NEW_STEP)  # kills before and after the commit
    # the child cleans its staging on success; killed children leave theirs for the OS
    # temp cleaner, which is never the store


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [pytest.param("gcs", marks=pytest.mark.gcs), pytest.param("s3", marks=pytest.mark.s3)],
)
def test_kill_between_object_store_operations(
    backend: str, request: pytest.FixtureRequest, fast_retry: RetryPolicy, tmp_path: Path
) -> None:
    bucket = str(request.getfixturevalue(f"{backend}_bucket"))
    runs = iter(range(10_000))

    def fresh() -> tuple[str, Store]:
        url = f"{bucket}/run{next(runs)}"
        store = open_store(url, retry=fast_retry)
        seed(store)
        return url, store

    kills, seen = kill_every_operation("sync", fresh, tmp_path / "staging")
    print(f"\n{backend}: {kills} kill points; latest() after a kill: {seen}")
    assert kills >= 5  # 3 uploads, the manifest, retention's deletes
    assert seen.get(NEW_STEP - 1) and seen.get(NEW_STEP)
