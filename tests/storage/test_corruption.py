"""Corruption of the newest checkpoint: truncated file, flipped bit, broken manifest.

``latest()`` must fall back to the previous valid checkpoint with a warning, the bad bytes
must never reach the caller (``read`` raises, ``fetch`` places nothing), and the corrupt
checkpoint is quarantined (no longer listed), not deleted. On the local backend the damage
is done to the real files on disk, behind the store's back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from colabjob.errors import CorruptCheckpointError
from colabjob.storage import Store, open_store
from colabjob.storage.catalog import CorruptCheckpointWarning
from colabjob.storage.checkpoints import CheckpointInfo, CheckpointStore
from colabjob.storage.retry import RetryPolicy
from tests.storage.ckpt_helpers import assert_intact, files_for

VICTIM = "model.bin"


def two_checkpoints(store: Store) -> tuple[CheckpointStore, CheckpointInfo, CheckpointInfo]:
    ckpts = CheckpointStore(store, keep=2)
    return ckpts, ckpts.save(1, files_for(1)), ckpts.save(2, files_for(2))


def truncate(store: Store, info: CheckpointInfo) -> None:
    data = store.read_bytes(info.key(VICTIM))
    store.write_bytes(info.key(VICTIM), data[: len(data) // 2])


def bitflip(store: Store, info: CheckpointInfo) -> None:
    data = bytearray(store.read_bytes(info.key(VICTIM)))
    data[len(data) // 3] ^= 0x10
    store.write_bytes(info.key(VICTIM), bytes(data))


def assert_quarantined(store: Store, ckpts: CheckpointStore, bad: CheckpointInfo) -> None:
    assert bad not in ckpts.list()
    assert not store.exists(bad.key("manifest.json"))
    q = f"quarantine/{bad.dirname}"
    manifest = json.loads(store.read_bytes(f"{q}/manifest.json"))
    assert manifest["step"] == bad.step  # kept, not deleted
    assert VICTIM in json.loads(store.read_bytes(f"{q}/reason.json"))["problem"]
    assert store.exists(bad.key(VICTIM))  # the data stays for a post-mortem
    # a later commit neither sweeps nor resurrects it
    ckpts.save(3, files_for(3))
    assert store.exists(bad.key(VICTIM)) and bad not in ckpts.list()


def test_truncated_file_falls_back_and_quarantines(store: Store) -> None:
    ckpts, first, second = two_checkpoints(store)
    truncate(store, second)
    with pytest.warns(CorruptCheckpointWarning, match=rf"{second.prefix}.*{VICTIM}"):
        assert ckpts.latest() == first
    assert ckpts.latest() == first  # quarantined: no second warning needed
    assert_intact(ckpts, first)
    assert_quarantined(store, ckpts, second)


def test_bitflip_is_caught_by_full_verify(store: Store) -> None:
    ckpts, first, second = two_checkpoints(store)
    bitflip(store, second)
    with pytest.warns(CorruptCheckpointWarning, match="sha256"):
        assert ckpts.latest(verify="full") == first
    assert_quarantined(store, ckpts, second)


def test_bitflip_is_never_loaded(store: Store, tmp_path: Path) -> None:
    ckpts, first, second = two_checkpoints(store)
    bitflip(store, second)
    assert ckpts.latest() == second  # same size: only the bytes can tell
    with pytest.warns(CorruptCheckpointWarning), pytest.raises(CorruptCheckpointError):
        ckpts.read(second, VICTIM)
    assert ckpts.latest() == first


@pytest.mark.parametrize("damage", [truncate, bitflip])
def test_fetch_places_nothing_from_a_bad_checkpoint(
    store: Store, tmp_path: Path, damage: Callable[[Store, CheckpointInfo], None]
) -> None:
    ckpts, _first, second = two_checkpoints(store)
    damage(store, second)
    out = tmp_path / "restore"
    with pytest.warns(CorruptCheckpointWarning), pytest.raises(CorruptCheckpointError):
        ckpts.fetch(second, out)
    assert list(out.iterdir()) == []  # not even the intact files of the bad checkpoint


def test_fetch_latest_falls_back_past_a_bitflip(store: Store, tmp_path: Path) -> None:
    ckpts, first, second = two_checkpoints(store)
    bitflip(store, second)
    out = tmp_path / "restore"
    with pytest.warns(CorruptCheckpointWarning):
        got = ckpts.fetch_latest(out)
    assert got == first
    for name, data in files_for(1).items():
        assert (out / name).read_bytes() == data
    assert_quarantined(store, ckpts, second)


def test_missing_file_falls_back(store: Store) -> None:
    ckpts, first, second = two_checkpoints(store)
    store.delete(second.key(VICTIM))
    with pytest.warns(CorruptCheckpointWarning, match="missing"):
        assert ckpts.latest() == first


def test_broken_manifest_falls_back(store: Store) -> None:
    ckpts, first, second = two_checkpoints(store)
    store.write_bytes(second.key("manifest.json"), b'{"format": "colabjob.checkpoint/1", "st')
    with pytest.warns(CorruptCheckpointWarning, match="bad manifest"):
        assert ckpts.latest() == first
    assert store.exists(f"quarantine/{second.dirname}/manifest.json")


def test_manifest_moved_to_another_prefix_is_rejected(store: Store) -> None:
    ckpts, _first, second = two_checkpoints(store)
    fake = "ckpt/000000000009-0123456789ab"
    for name in files_for(2):
        store.write_bytes(f"{fake}/{name}", store.read_bytes(second.key(name)))
    store.write_bytes(f"{fake}/manifest.json", store.read_bytes(second.key("manifest.json")))
    with pytest.warns(CorruptCheckpointWarning, match="moved or edited"):
        assert ckpts.latest() == second


def test_corrupt_checkpoint_never_costs_an_older_good_one(store: Store) -> None:
    ckpts, _first, second = two_checkpoints(store)
    truncate(store, second)
    with pytest.warns(CorruptCheckpointWarning):
        ckpts.save(3, files_for(3))
    # keep=2 valid: 3 and 1 (2 is quarantined), so 1 survives retention
    assert [i.step for i in ckpts.list()] == [1, 3]


# ---- damage done behind the store's back, on the real files ------------------------------


@pytest.fixture
def local(tmp_path: Path, fast_retry: RetryPolicy) -> tuple[Store, Path]:
    root = tmp_path / "jobs"
    return open_store(str(root), retry=fast_retry), root


def test_on_disk_truncation_and_bitflip(local: tuple[Store, Path], tmp_path: Path) -> None:
    store, root = local
    ckpts = CheckpointStore(store, keep=3)
    infos = [ckpts.save(step, files_for(step)) for step in (1, 2, 3)]
    os.truncate(root / infos[2].prefix / VICTIM, 100)
    path = root / infos[1].prefix / "sub" / "opt.bin"
    with open(path, "r+b") as f:
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.warns(CorruptCheckpointWarning) as caught:
        assert ckpts.latest(verify="full") == infos[0]
    assert len(caught) == 2
    assert [i.step for i in ckpts.list()] == [1]
    assert sorted(os.listdir(root / "quarantine")) == sorted([infos[2].dirname, infos[1].dirname])
