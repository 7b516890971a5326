"""Files written in place under a reserved checkpoint prefix (``CheckpointStore.reserve`` +
``Written`` sources, what a sharded save's ranks do): the commit lists them with the given
size and sha256 without reading or copying them, refuses a size that does not match the
stored file, and until the manifest exists the prefix is no checkpoint (the previous one
stays the newest; a later commit sweeps it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from colabjob.errors import CheckpointError, ConfigError
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.staging import Written


def _write_in_place(root: Path, prefix: str, name: str, data: bytes) -> Written:
    store = open_store(root)
    got = store.fsspec_target(f"{prefix}/{name}")
    assert got is not None
    fs, path = got
    with fs.open(path, "wb") as f:  # type: ignore[attr-defined]
        f.write(data)
    return Written(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_written_files_are_listed_where_they_lie(tmp_path: Path) -> None:
    ckpts = CheckpointStore(open_store(tmp_path))
    prefix = ckpts.reserve(4)
    shard = _write_in_place(tmp_path, prefix, "dcp/__0_0.distcp", b"shard bytes" * 1000)
    info = ckpts.save(4, {"dcp/__0_0.distcp": shard, "state.json": b"{}"}, prefix=prefix)
    assert info.prefix == prefix and info.step == 4
    entry = info.manifest["files"]["dcp/__0_0.distcp"]
    assert entry == {"size": shard.size, "sha256": shard.sha256}
    fetched = ckpts.fetch(ckpts.latest(verify="full"), tmp_path / "out")  # every byte checked
    assert (fetched / "dcp" / "__0_0.distcp").read_bytes() == b"shard bytes" * 1000


def test_a_wrong_size_is_refused_and_nothing_is_committed(tmp_path: Path) -> None:
    ckpts = CheckpointStore(open_store(tmp_path))
    ckpts.save(2, {"a": b"old"})
    prefix = ckpts.reserve(4)
    shard = _write_in_place(tmp_path, prefix, "dcp/x", b"12345")
    lie = Written(size=shard.size + 1, sha256=shard.sha256)
    with pytest.raises(CheckpointError, match="expected 6"):
        ckpts.save(4, {"dcp/x": lie}, prefix=prefix)
    latest = ckpts.latest()
    assert latest is not None and latest.step == 2


def test_an_uncommitted_prefix_is_no_checkpoint_and_is_swept(tmp_path: Path) -> None:
    """A crash after the ranks wrote their files, before the manifest: the previous
    checkpoint stays the newest, and the next commit sweeps the orphan."""
    ckpts = CheckpointStore(open_store(tmp_path))
    ckpts.save(2, {"a": b"old"})
    prefix = ckpts.reserve(4)
    _write_in_place(tmp_path, prefix, "dcp/__0_0.distcp", b"never committed")
    assert prefix not in ckpts.sweep_staging(include_newer=True)  # reserved here: kept
    after_crash = CheckpointStore(open_store(tmp_path))  # a new process
    latest = after_crash.latest()
    assert latest is not None and latest.step == 2
    after_crash.save(6, {"a": b"new"})
    assert not (tmp_path / prefix).exists()


def test_a_prefix_must_be_one_for_the_step(tmp_path: Path) -> None:
    ckpts = CheckpointStore(open_store(tmp_path))
    prefix = ckpts.reserve(4)
    with pytest.raises(ConfigError, match="not one reserved for step 5"):
        ckpts.save(5, {"a": b"x"}, prefix=prefix)


def test_a_memory_store_offers_no_fsspec_target() -> None:
    assert open_store("memory://written-in-place").fsspec_target("ckpt/x") is None
