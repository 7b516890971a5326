"""The DCP write of a sharded checkpoint, in one process (no process group): every file is
hashed as it is written (the digests equal the files' real sha256 and sizes), a background
write keeps the values of the moment it started while training changes the live tensors,
and the files committed in place load back, on local disk and in a GCS or S3 bucket (the
emulators); without an fsspec target (``memory://``) they
are moved from a local folder into the commit's staging directory. The host copy is reused
by the next background save (same buffers, current values) and freed by a synchronous one;
the save chooser counts it as room for the next copy and frees it when saving turns
synchronous.
"""

from __future__ import annotations

import hashlib
import io
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from colabjob.jobs.checkpointing.committer import _Held
from colabjob.jobs.state.dcp_writer import (
    HostCopy,
    local_nbytes,
    shard_target,
    start_shard_write,
)
from colabjob.jobs.state.hashing_fs import _KICK, _SLICE, _HashingStream
from colabjob.jobs.state.host_memory import MARGIN_FRACTION, MIN_MARGIN, SaveChooser
from colabjob.jobs.state.pinned import StagingPool
from colabjob.jobs.state.sharded import SHARDED_DIR, load_sharded, sharded_state
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.staging import Written

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _trained(width: int = 64) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    return model, opt


def _clone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_on(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()


def _zip_crcs(data: bytes) -> list[int]:
    """The CRC32 of every record in the zip central directories of ``data``."""
    out, i = [], data.find(b"PK\x01\x02")
    while i != -1:
        out.append(int.from_bytes(data[i + 16 : i + 20], "little"))
        i = data.find(b"PK\x01\x02", i + 4)
    return out


@pytest.mark.parametrize(
    ("background", "width"),
    [(True, 64), (False, 64), (True, 3000)],  # 3000: tensors of 750 KB, hashed in slices
)
def test_files_written_in_place_are_hashed_and_load_back(
    tmp_path: Path, background: bool, width: int
) -> None:
    model, opt = _trained(width)
    at_save = _clone(model)
    ckpts = CheckpointStore(open_store(tmp_path / "job"))
    prefix = ckpts.reserve(3)
    target = shard_target(ckpts.store, prefix, None)
    assert target.in_place and target.sync_files
    fits: Any = (lambda nbytes: nbytes > 0) if background else None
    shards = start_shard_write(
        sharded_state(model, opt), target, prefix=prefix, fits=fits, group=None
    )
    assert (shards._future is not None) is background
    _train_on(model, opt)  # training goes on while it writes: the checkpoint keeps step 1
    files = shards.wait(tmp_path / "unused")
    assert f"{SHARDED_DIR}/.metadata" in files and f"{SHARDED_DIR}/__0_0.distcp" in files
    for name, src in files.items():
        assert isinstance(src, Written)
        data = (tmp_path / "job" / prefix / name).read_bytes()
        assert (src.size, src.sha256) == (len(data), hashlib.sha256(data).hexdigest()), name
    # torch.save's zip CRC32s were skipped (the sha256 covers the bytes), and torch's
    # process-wide flag is back as it was
    shard = (tmp_path / "job" / prefix / f"{SHARDED_DIR}/__0_0.distcp").read_bytes()
    assert _zip_crcs(shard) and not any(_zip_crcs(shard))
    assert torch.serialization.get_crc32_options() is True
    info = ckpts.save(3, {**files, "state.json": b"{}"}, prefix=prefix)
    local = ckpts.fetch(ckpts.latest(verify="full") or info, tmp_path / "fetched")
    fresh, fresh_opt = _trained(width)
    _train_on(fresh, fresh_opt)
    load_sharded(fresh, fresh_opt, local / SHARDED_DIR)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, at_save[k]), k


@pytest.mark.parametrize(
    "bucket", [pytest.param("gcs", marks=pytest.mark.gcs), pytest.param("s3", marks=pytest.mark.s3)]
)
def test_a_bucket_store_is_written_in_place_and_loads_back(
    tmp_path: Path, bucket: str, request: pytest.FixtureRequest
) -> None:
    """On ``gs://`` (fake-gcs-server) and ``s3://`` (moto) every file goes straight into the
    checkpoint's prefix in the bucket, one upload each, through the store's own fsspec
    filesystem: what every rank of every machine can reach. The commit lists them in place
    (their stored sizes checked), a full verification re-reads every byte, and they load."""
    model, opt = _trained()
    at_save = _clone(model)
    ckpts = CheckpointStore(open_store(request.getfixturevalue(f"{bucket}_bucket")))
    prefix = ckpts.reserve(4)
    target = shard_target(ckpts.store, prefix, None)
    assert target.in_place and not target.sync_files
    shards = start_shard_write(
        sharded_state(model, opt), target, prefix=prefix, fits=lambda n: True, group=None
    )
    _train_on(model, opt)
    files = shards.wait(tmp_path / "unused")
    assert all(isinstance(src, Written) for src in files.values())
    for name, src in files.items():  # in the bucket already, as hashed
        data = ckpts.store.read_bytes(f"{prefix}/{name}")
        assert (src.size, src.sha256) == (len(data), hashlib.sha256(data).hexdigest()), name
    assert not (tmp_path / "unused").exists()  # nothing staged locally
    ckpts.save(4, {**files, "state.json": b"{}"}, prefix=prefix)
    info = ckpts.latest(verify="full")
    assert info is not None and info.step == 4
    local = ckpts.fetch(info, tmp_path / "fetched")
    fresh, fresh_opt = _trained()
    _train_on(fresh, fresh_opt)
    load_sharded(fresh, fresh_opt, local / SHARDED_DIR)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, at_save[k]), k


def test_the_stream_hashes_every_byte_of_writes_of_any_size(tmp_path: Path) -> None:
    """Writes around and far above the slice size, from bytes, a bytearray and a tensor's
    memory, give the real file's size and sha256; a write has been hashed when it returns
    (the caller's buffer changed afterwards does not change the digest)."""
    gen = torch.Generator().manual_seed(1)
    tensor = torch.randn(3 * _SLICE // 4 + 5, generator=gen)  # 3 slices and 20 bytes
    reused = bytearray(torch.randint(0, 256, (_SLICE * 2 + 1,), dtype=torch.uint8).numpy())
    chunks: list[Any] = [
        b"header", bytes(_SLICE), tensor.numpy(), bytes(range(256)) * (_SLICE // 256 + 1),
        reused, b"", b"x",
    ]  # fmt: skip
    path = tmp_path / "f.bin"
    with open(path, "wb") as raw:
        stream = _HashingStream(raw)
        for chunk in chunks:
            assert stream.write(chunk) == memoryview(chunk).nbytes
            if chunk is reused:
                reused[:] = bytes(len(reused))  # the caller reuses its buffer
        stream.finish()
    data = path.read_bytes()
    assert stream.size == len(data) == stream.tell()
    assert stream.sha.hexdigest() == hashlib.sha256(data).hexdigest()
    assert stream._pool is None  # the helper thread is gone


def test_a_stream_to_be_fsynced_hands_its_bytes_to_the_disk_as_it_goes(tmp_path: Path) -> None:
    """With ``kick`` (a file DCP will fsync) the bytes written are handed to the disk every
    ``_KICK`` bytes (Linux's sync_file_range), the digest unchanged; a stream with no file
    descriptor (a ``BytesIO``) stops kicking and still hashes every byte."""
    piece = bytes(range(256)) * (_KICK // 512 + 1)  # a little over half of _KICK
    path = tmp_path / "f.bin"
    with open(path, "wb") as raw:
        stream = _HashingStream(raw, kick=True)
        for _ in range(3):
            stream.write(piece)
        stream.finish()
    data = path.read_bytes()
    assert stream.size == len(data) == 3 * len(piece)
    assert stream.sha.hexdigest() == hashlib.sha256(data).hexdigest()
    if sys.platform.startswith("linux"):
        assert stream._kicked == 2 * len(piece)  # after the 2nd write, past _KICK; not the 3rd
    memory = _HashingStream(io.BytesIO(), kick=True)
    memory.write(piece * 2)
    assert not memory._kick and memory._kicked == 0
    assert memory.sha.hexdigest() == hashlib.sha256(piece * 2).hexdigest()


def test_without_an_fsspec_target_the_files_move_into_staging(tmp_path: Path) -> None:
    model, opt = _trained()
    ckpts = CheckpointStore(open_store("memory://dcp-writer-test"))
    prefix = ckpts.reserve(2)
    local = tmp_path / "shards"
    local.mkdir()
    target = shard_target(ckpts.store, prefix, str(local))
    assert not target.in_place
    shards = start_shard_write(
        sharded_state(model, opt), target, prefix=prefix, fits=lambda n: True, group=None
    )
    staging = tmp_path / "staging"
    files = shards.wait(staging)
    assert set(files) >= {f"{SHARDED_DIR}/.metadata", f"{SHARDED_DIR}/__0_0.distcp"}
    assert all(isinstance(p, Path) and p.parent == staging / SHARDED_DIR for p in files.values())
    assert not local.exists()  # the temp folder is gone once its files moved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        info = ckpts.save(2, dict(files), prefix=prefix)
    assert set(info.manifest["files"]) == set(files)


def test_the_host_copy_is_reused_and_always_current(tmp_path: Path) -> None:
    """Two background saves through one ``HostCopy``: the second copies into the first's
    buffers (same memory) and writes the values of its own step; a save that does not fit
    frees them."""
    model, opt = _trained()
    host = HostCopy()
    ckpts = CheckpointStore(open_store(tmp_path / "job"))
    saved = []
    for step in (1, 2):
        prefix = ckpts.reserve(step)
        state = sharded_state(model, opt)
        shards = start_shard_write(
            state, shard_target(ckpts.store, prefix, None), prefix=prefix,
            fits=lambda n: True, group=None, host=host,
        )  # fmt: skip
        saved.append((_clone(model), {k: v.data_ptr() for k, v in host._cache["model"].items()}))
        _train_on(model, opt)
        files = shards.wait(tmp_path)
        ckpts.save(step, {**files, "state.json": b"{}"}, prefix=prefix)
    assert saved[0][1] == saved[1][1]  # the same buffers
    assert host.nbytes > 0
    local = ckpts.fetch(ckpts.latest() or pytest.fail("no checkpoint"), tmp_path / "fetched")
    fresh, fresh_opt = _trained()
    load_sharded(fresh, fresh_opt, local / SHARDED_DIR)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[1][0][k]), k
    prefix = ckpts.reserve(3)
    start_shard_write(
        sharded_state(model, opt), shard_target(ckpts.store, prefix, None), prefix=prefix,
        fits=lambda n: False, group=None, host=host,
    )  # fmt: skip
    assert host.nbytes == 0


def test_the_chooser_counts_the_kept_host_copy_as_room_and_frees_it() -> None:
    """The committer's ``SaveChooser`` sees the kept copy as room for the next one (it is
    reused), and a save that turns synchronous frees it."""
    model, opt = _trained()
    host = HostCopy()
    host.stage(sharded_state(model, opt))
    held = host.nbytes
    state = local_nbytes(sharded_state(model, opt))
    assert held == state > 0
    margin = max(MIN_MARGIN, int(MARGIN_FRACTION * state))
    free = [state + margin - held]  # enough only with the kept copy counted
    said: list[str] = []
    chooser = SaveChooser(
        "auto", say=said.append, buffers=_Held(StagingPool(), host), available=lambda: free[0]
    )
    assert chooser.background(state) and host.nbytes == held
    free[0] = 0
    assert not chooser.background(state)
    assert host.nbytes == 0 and len(said) == 1
