"""The checkpoint commit protocol on every backend (local, memory, GCS emulator).

Manifest last and create-only, newest by step, retention (manifest first, only after a
commit), fencing, the staging sweep, background commits, and fault injection with the
flaky store. Real stores throughout; order and blocking are observed through a hooked
store, never through timing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import google_crc32c
import pytest

from colabjob.errors import (
    ConfigError,
    StaleEpochError,
    StoragePermissionError,
    TransientStorageError,
)
from colabjob.storage import Store, open_store
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.retry import RetryPolicy
from tests.fakes import FakeClock
from tests.storage.ckpt_helpers import (
    Gate,
    HookedStore,
    Recorder,
    assert_intact,
    files_for,
    payload,
)
from tests.storage.flaky import FakeHTTPError, FlakyStore


def orphan(store: Store, step: int, uid: str = "deadbeef0000") -> str:
    prefix = f"ckpt/{step:012d}-{uid}"
    store.write_bytes(f"{prefix}/model.bin", b"half a checkpoint")
    return prefix


# ---- the protocol on every backend ---------------------------------------------------------


def test_save_list_latest_read_fetch(store: Store, tmp_path: Path) -> None:
    clock = FakeClock()
    ckpts = CheckpointStore(store, clock=clock)
    src = tmp_path / "big.bin"
    src.write_bytes(payload(2, "from-path", 100_000))
    assert ckpts.latest() is None and ckpts.list() == []

    first = ckpts.save(1, files_for(1), epoch=3, config_hash="cfg1")
    clock.advance(10)
    files2: dict[str, bytes | Path] = {**files_for(2), "big.bin": src}
    second = ckpts.save(
        2, files2, epoch=3, config_hash="cfg2", meta={"loss": 1.5}, versions={"torch": "2.x"}
    )

    assert [i.step for i in ckpts.list()] == [1, 2]
    assert ckpts.latest() == second and first != second
    assert second.prefix.startswith("ckpt/000000000002-")
    m = second.manifest
    assert (m["step"], m["epoch"], m["config_hash"]) == (2, 3, "cfg2")
    assert m["created_at"] == clock.time() and m["meta"] == {"loss": 1.5}
    assert m["versions"]["torch"] == "2.x" and {"colabjob", "python"} <= set(m["versions"])
    assert set(m["files"]) == {"model.bin", "sub/opt.bin", "big.bin"}
    for name, src_data in {**files_for(2), "big.bin": src.read_bytes()}.items():
        entry = m["files"][name]
        assert entry["size"] == len(src_data)
        assert entry["sha256"] == hashlib.sha256(src_data).hexdigest()
        assert ckpts.read(second, name) == src_data
        if store.crc32c_supported:
            crc = base64.b64encode(google_crc32c.Checksum(src_data).digest()).decode()
            assert entry["crc32c"] == crc == store.crc32c(second.key(name))
        else:
            assert "crc32c" not in entry
    stored = json.loads(store.read_bytes(second.key("manifest.json")))
    assert stored["files"] == m["files"]

    out = ckpts.fetch(second, tmp_path / "restore")
    assert (out / "sub" / "opt.bin").read_bytes() == files_for(2)["sub/opt.bin"]
    assert (out / "big.bin").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["big.bin", "model.bin", "sub"]
    assert second.stats is not None
    assert second.stats.nbytes == sum(map(len, files_for(2).values())) + 100_000
    assert second.stats.nfiles == 3 and second.stats.upload_seconds >= 0


def test_a_prefix_without_manifest_does_not_exist(store: Store) -> None:
    ckpts = CheckpointStore(store)
    ckpts.save(1, files_for(1))
    orphan(store, 7)
    store.write_bytes("ckpt/not-a-checkpoint/manifest.json", b"{}")
    assert [i.step for i in ckpts.list()] == [1]
    assert ckpts.latest().step == 1  # type: ignore[union-attr]


def test_latest_is_by_step_never_by_time(store: Store) -> None:
    clock = FakeClock()
    ckpts = CheckpointStore(store, clock=clock, keep=5)
    ckpts.save(10, files_for(10))
    clock.advance(100)
    ckpts.save(5, files_for(5))  # written later, but an older step
    assert ckpts.latest().step == 10  # type: ignore[union-attr]
    clock.advance(100)
    again = ckpts.save(10, files_for(10))  # same step again: the later one wins
    assert ckpts.latest() == again
    assert [i.step for i in ckpts.list()] == [5, 10, 10]


def test_retention_keeps_newest_k_and_deletes_manifest_first(store: Store) -> None:
    rec = Recorder()
    ckpts = CheckpointStore(HookedStore(store, rec), keep=2)
    infos = [ckpts.save(step, files_for(step)) for step in (1, 2, 3, 4)]
    assert [i.step for i in ckpts.list()] == [3, 4]
    for old, newer in ((infos[0], infos[2]), (infos[1], infos[3])):
        assert not [k for k in store.list() if k.startswith(old.prefix + "/")]
        # only after the newer commit, and the manifest before the data
        committed = rec.index("create", newer.key("manifest.json"))
        gone_manifest = rec.index("delete", old.key("manifest.json"))
        data_deletes = [
            i
            for i, (op, key) in enumerate(rec.events)
            if op in ("delete", "delete_prefix") and key.startswith(old.prefix)
        ]
        assert committed < gone_manifest == min(data_deletes)
        assert len(data_deletes) > 1
    for info in infos[2:]:
        assert_intact(ckpts, info)


def test_retention_keeps_k_valid_past_a_corrupt_one(store: Store) -> None:
    ckpts = CheckpointStore(store, keep=3)
    infos = [ckpts.save(step, files_for(step)) for step in (1, 2, 3)]
    store.write_bytes(infos[2].key("model.bin"), b"truncated")
    with pytest.warns(UserWarning, match="corrupt"):
        ckpts.save(4, files_for(4))
    # 4, 2 and 1 are the three valid ones: nothing deleted, 3 quarantined
    assert [i.step for i in ckpts.list()] == [1, 2, 4]


@pytest.mark.parametrize("keep", [0, 1])
def test_keep_below_two_is_a_config_error(keep: int) -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        CheckpointStore(open_store("memory://keep"), keep=keep)


def test_bad_input_is_a_config_error(store: Store, tmp_path: Path) -> None:
    ckpts = CheckpointStore(store)
    for files in ({}, {"../x": b"1"}, {"manifest.json": b"1"}, {"/abs": b"1"}):
        with pytest.raises(ConfigError):
            ckpts.save(1, files)
    with pytest.raises(ConfigError, match="not a file"):
        ckpts.save(1, {"a": tmp_path / "missing"})
    with pytest.raises(ConfigError, match="JSON"):
        ckpts.save(1, {"a": b"1"}, meta={"x": object()})
    with pytest.raises(ConfigError, match="step"):
        ckpts.save(-1, {"a": b"1"})
    with pytest.raises(ConfigError, match="step"):  # at once, not from the background
        ckpts.save_async(-1, {"a": b"1"})
    with pytest.raises(ConfigError):
        ckpts.save_async(1, {"../a": b"1"})
    assert ckpts.list() == [] and store.list() == []


def test_save_a_directory(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "snap"
    (src / "inner").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 10)
    (src / "inner" / "b.bin").write_bytes(b"b" * 20)
    info = CheckpointStore(store).save(3, src)
    assert set(info.files) == {"a.bin", "inner/b.bin"}
    assert CheckpointStore(store).read(info, "inner/b.bin") == b"b" * 20


# ---- fencing and the staging sweep ---------------------------------------------------------


def test_fence_rejects_a_stale_epoch_before_uploading(store: Store) -> None:
    ckpts = CheckpointStore(store, fence=lambda: 4)
    ckpts.save(1, files_for(1), epoch=4)
    with pytest.raises(StaleEpochError, match="epoch 3"):
        ckpts.save(2, files_for(2), epoch=3)
    assert [i.step for i in ckpts.list()] == [1]
    assert ckpts.latest().epoch == 4  # type: ignore[union-attr]


def test_fence_checked_just_before_the_manifest(store: Store) -> None:
    epochs = iter([1, 2])  # the lease moves to epoch 2 while our files upload
    ckpts = CheckpointStore(store, fence=lambda: next(epochs))
    with pytest.raises(StaleEpochError):
        ckpts.save(5, files_for(5), epoch=1)
    assert ckpts.list() == []
    leftovers = {k.split("/")[1] for k in store.list("ckpt")}
    assert len(leftovers) == 1 and next(iter(leftovers)).startswith("000000000005-")
    # the new owner's next commit sweeps the fenced-out orphan
    owner = CheckpointStore(store, fence=lambda: 2)
    owner.save(6, files_for(6), epoch=2)
    assert {k.split("/")[1][:12] for k in store.list("ckpt")} == {"000000000006"}


def test_sweep_staging(store: Store) -> None:
    ckpts = CheckpointStore(store, keep=2)
    ckpts.save(10, files_for(10))
    low, high = orphan(store, 3), orphan(store, 50)
    same = orphan(store, 10, "0123456789ab")
    swept = ckpts.sweep_staging()
    assert sorted(swept) == sorted([low, same])
    assert store.exists(f"{high}/model.bin")  # may be a live writer's: kept
    assert [i.step for i in ckpts.list()] == [10]
    assert ckpts.sweep_staging(include_newer=True) == [high]
    assert {k.split("/")[1][:12] for k in store.list("ckpt")} == {"000000000010"}


# ---- background commits --------------------------------------------------------------------


def test_save_async_returns_before_the_upload_and_wait_commits(
    store: Store, tmp_path: Path
) -> None:
    gate, rec = Gate(), Recorder()
    slow = HookedStore(HookedStore(store, rec), gate)
    staging = tmp_path / "staging"
    ckpts = CheckpointStore(slow, staging_dir=staging)
    threads: list[str] = []

    def writer(d: Path) -> dict[str, Path]:
        threads.append(threading.current_thread().name)
        for name, data in files_for(7).items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
        return {name: d / name for name in files_for(7)}

    pending = ckpts.save_async(7, writer)
    assert gate.reached.wait(timeout=60)  # the upload started and is held by the remote
    assert not pending.done()
    with pytest.raises(TimeoutError):
        pending.wait(timeout=0)
    assert ckpts.latest() is None
    assert threads and threads[0] != threading.current_thread().name
    gate.open()
    info = pending.wait()
    assert pending.done() and ckpts.latest() == info
    assert_intact(ckpts, info)
    assert info.stats is not None and info.stats.nbytes == sum(map(len, files_for(7).values()))
    assert list(staging.iterdir()) == []  # staging cleaned up after the commit


def test_save_async_copies_path_sources_before_returning(store: Store, tmp_path: Path) -> None:
    gate = Gate()
    ckpts = CheckpointStore(HookedStore(store, gate), staging_dir=tmp_path / "staging")
    src = tmp_path / "weights.bin"
    src.write_bytes(b"old" * 1000)
    pending = ckpts.save_async(1, {"weights.bin": src})
    src.write_bytes(b"new" * 1000)  # the caller moves on at once
    gate.open()
    info = pending.wait()
    assert ckpts.read(info, "weights.bin") == b"old" * 1000


def test_one_commit_in_flight_at_a_time(store: Store) -> None:
    gate, rec = Gate(), Recorder()
    ckpts = CheckpointStore(HookedStore(HookedStore(store, rec), gate))
    first = ckpts.save_async(1, files_for(1))
    assert gate.reached.wait(timeout=60)
    second_started = threading.Event()
    box: dict[str, object] = {}

    def second() -> None:
        second_started.set()
        box["pending"] = ckpts.save_async(2, files_for(2))

    t = threading.Thread(target=second)
    t.start()
    assert second_started.wait(timeout=60)
    gate.open()
    t.join(timeout=60)
    a = first.wait()
    b = box["pending"].wait()  # type: ignore[attr-defined]
    uploads_of_b = [
        i
        for i, (op, key) in enumerate(rec.events)
        if op == "write_bytes" and key.startswith(b.prefix)
    ]
    assert rec.index("create", a.key("manifest.json")) < min(uploads_of_b)
    assert [i.step for i in ckpts.list()] == [1, 2]


def test_a_script_that_returns_right_after_save_async_still_commits(tmp_path: Path) -> None:
    root = tmp_path / "job"
    script = (
        "import sys\n"
        "from colabjob.storage.store import open_store\n"
        "from colabjob.storage.checkpoints import CheckpointStore\n"
        f"c = CheckpointStore(open_store({str(root)!r}), staging_dir={str(tmp_path / 's')!r})\n"
        "def writer(d):\n"
        "    (d / 'w.bin').write_bytes(b'x' * 9)\n"
        "    return {'w.bin': d / 'w.bin'}\n"
        "c.save_async(9, writer)\n"
    )  # no wait(): the interpreter must not drop the upload on its way out
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = CheckpointStore(open_store(str(root))).latest()
    assert info is not None and info.step == 9
    assert CheckpointStore(open_store(str(root))).read(info, "w.bin") == b"x" * 9


def test_wait_reraises_the_commit_error(store: Store) -> None:
    denied = FlakyStore(store, permanent=FakeHTTPError(403, "Forbidden"), only={"write_bytes"})
    ckpts = CheckpointStore(denied)
    pending = ckpts.save_async(1, files_for(1))
    with pytest.raises(StoragePermissionError):
        pending.wait()
    assert pending.done() and pending.failed()
    with pytest.raises(StoragePermissionError):
        pending.wait()  # every wait() sees it
    # the next save is not blocked by the failed one
    ok = CheckpointStore(store).save(2, files_for(2))
    assert CheckpointStore(store).latest() == ok


# ---- fault injection -----------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
def test_commit_survives_transient_faults(store: Store, when: str) -> None:
    no_wait = RetryPolicy(attempts=12, sleep=lambda _s: None)
    flaky = FlakyStore(store, rate=0.3, seed=7, when=when, retry=no_wait)  # type: ignore[arg-type]
    ckpts = CheckpointStore(flaky, keep=2)
    infos = [ckpts.save(step, files_for(step)) for step in (1, 2, 3)]
    assert sum(flaky.failures.values()) > 5  # the faults really happened
    clean = CheckpointStore(store)
    assert [i.step for i in clean.list()] == [2, 3]  # retention ran too
    for info in infos[1:]:
        assert clean.latest(verify="full") is not None
        assert_intact(clean, info)
    assert clean.sweep_staging(include_newer=True) == []  # nothing half-written left


def test_a_permanent_error_surfaces_at_once(store: Store) -> None:
    denied = FlakyStore(store, permanent=PermissionError(13, "Permission denied"), only={"create"})
    ckpts = CheckpointStore(denied)
    with pytest.raises(StoragePermissionError):
        ckpts.save(1, files_for(1))
    assert denied.calls["create"] == 1  # not retried
    assert CheckpointStore(store).list() == []


def test_transient_errors_give_up_after_the_policy(store: Store) -> None:
    policy = RetryPolicy(attempts=3, sleep=lambda _s: None)
    down = FlakyStore(store, rate=1.0, only={"put_file", "write_bytes"}, retry=policy)
    with pytest.raises(TransientStorageError):
        CheckpointStore(down).save(1, files_for(1))
    assert CheckpointStore(store).list() == []
