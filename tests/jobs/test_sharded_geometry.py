"""A whole checkpoint resumed into a sharded model: 1 plain process -> 2 FSDP2 processes.

A single process (plain model, 4 per micro-batch x accumulation 2) trains to step 3 and
commits a whole checkpoint (``model.safetensors``, optimizer state by parameter index).
Two FSDP processes (2 x accumulation 2 per rank, ``allow_geometry_change``) resume it
(``colabjob.jobs.state.whole_to_sharded``): right after the resume their model and
optimizer, gathered whole, equal the checkpoint's bit for bit; the global sample order
continues; their final checkpoint is sharded (``dcp/``). The reverse (2 FSDP -> 1 plain)
is ``test_sharded.test_2_to_1_reshards_and_continues_the_sample_order``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from colabjob.jobs.data import ResumableSampler
from colabjob.jobs.state.format import MODEL_FILE
from colabjob.jobs.state.restore import read_optimizer_state
from colabjob.jobs.state.sharded import SHARDED_DIR
from colabjob.jobs.state.tensorfile import TensorFile
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore

from .dist_child import DATA_SEED, N_SAMPLES, segment
from .test_sharded import _launch


@pytest.mark.slow
def test_1_to_2_loads_whole_state_into_shards_and_continues_the_sample_order(
    tmp_path: Path,
) -> None:
    job = tmp_path / "job"
    first = segment(job, total=6, stop_at=3, init_seed=1, batch_size=4, grad_accum=2)
    assert first["outcome"]["checkpoint_step"] == 3
    ckpts = CheckpointStore(open_store(job))
    whole = ckpts.latest()
    assert whole is not None and MODEL_FILE in whole.files
    local = ckpts.fetch(whole, tmp_path / "whole")
    dump = tmp_path / "start.pt"
    (resumed,) = _launch(
        tmp_path,
        "--segment", f"{job}:-:5",
        "--total", "6",
        "--batch-size", "2",
        "--allow-geometry-change",
        "--dump-start", str(dump),
    )
    # the resumed shards, gathered: the whole checkpoint's weights and optimizer state
    start = torch.load(dump, weights_only=True)
    with TensorFile(local / MODEL_FILE) as f:
        saved = dict(f.items())
    assert start["model"].keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(start["model"][k], v), k
    saved_opt = read_optimizer_state(local)["optimizer"]
    names = ["0.weight", "0.bias", "3.weight", "3.bias"]  # the optimizer's parameter order
    assert set(start["optimizer"]["state"]) == set(names)
    for i, name in enumerate(names):
        for key, value in saved_opt["state"][i].items():
            assert torch.equal(start["optimizer"]["state"][name][key], value), (name, key)
    # the global sample order continues: 3 single-process steps, then 3 steps on 2 ranks
    rank0, rank1 = resumed[0]["steps"], resumed[1]["steps"]
    assert resumed[0]["outcome"]["first_step"] == 3 and [s for s, _ in rank0] == [4, 5, 6]
    got = [ids for _, ids in first["steps"]] + [
        ids0[:2] + ids1[:2] + ids0[2:] + ids1[2:]
        for (_, ids0), (_, ids1) in zip(rank0, rank1, strict=True)
    ]
    order = ResumableSampler(range(N_SAMPLES), seed=DATA_SEED).order
    flat = [i for ids in got for i in ids]
    assert flat == order(0)[:32].tolist() + order(1)[:16].tolist()
    last = ckpts.latest()
    assert last is not None and last.step == 6
    assert f"{SHARDED_DIR}/.metadata" in last.files and MODEL_FILE not in last.files
