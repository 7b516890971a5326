"""Sharded state (FSDP2, ``torch.distributed.checkpoint``) through the Session API, on CPU
with gloo and 2 real processes (``tests/jobs/fsdp_child.py`` via ``colabjob.runner.launch``).

A 2-process FSDP job SIGKILLed right after committing a checkpoint and resumed in new
processes ends bit-identical (model and optimizer, gathered from the DCP files) to an
uninterrupted one, and reads the same samples per step; the manifest lists every rank's
``.distcp`` file and ``.metadata`` with size and sha256. A 2-process sharded checkpoint
resumes in one process with a plain model (``allow_geometry_change``: DCP reshards) and
continues the global sample order; its step-3 shards load whole into a plain model and
optimizer. In-process: a forged ``.metadata`` pickle is refused
without running it.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from colabjob.errors import UnsafeCheckpointError
from colabjob.jobs.data import ResumableSampler
from colabjob.jobs.state.sharded import SHARDED_DIR, _SafeReader, load_sharded
from colabjob.runner.launch import launch
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore

from .dist_child import DATA_SEED, N_SAMPLES, build, segment

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # over os.environ at each launch
LAUNCH_TIMEOUT = 150.0


def _launch(tmp: Path, *args: str, name: str = "out", ok: bool = True) -> list[list[Any]]:
    out = tmp / name
    cmd = [sys.executable, "-m", "tests.jobs.fsdp_child", str(out), *args]
    got = launch(cmd, nproc=2, env={**os.environ, **ENV}, cwd=REPO, timeout=LAUNCH_TIMEOUT)
    assert (got.exit_code == 0) is ok, got
    n = len(list(tmp.glob(f"{name}.*.rank0.json")))
    return [
        [json.loads((tmp / f"{name}.{i}.rank{r}.json").read_text()) for r in range(2)]
        for i in range(n)
    ]


def _full_state(root: Path | str, tmp: Path) -> tuple[int, dict[str, Any]]:
    """The newest checkpoint's model and optimizer, gathered whole from its DCP files."""
    ckpts = CheckpointStore(open_store(root))
    info = ckpts.latest()
    assert info is not None
    local = tmp / f"fetched-{Path(str(root)).name}"
    ckpts.fetch(info, local)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp_to_torch_save(local / SHARDED_DIR, local / "full.pt")
    return info.step, torch.load(local / "full.pt", weights_only=True)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}"))
        return out
    return {prefix: tree}


@pytest.mark.slow
def test_2_to_2_after_a_sigkill_is_bit_identical(tmp_path: Path) -> None:
    """Dropout per rank, AdamW, warmup, accumulation 2: a straight 2-process FSDP run
    against one whose rank 0 is SIGKILLed right after committing step 5, resumed in new
    processes: the same samples per step and a bit-identical final model and optimizer."""
    a, b = tmp_path / "a", tmp_path / "b"
    (straight,) = _launch(tmp_path, "--segment", f"{a}:-:0", "--total", "8")
    _launch(tmp_path, "--segment", f"{b}:-:0", "--total", "8", "--kill-at", "5", name="k", ok=False)
    killed = CheckpointStore(open_store(b)).latest()
    assert killed is not None and killed.step == 5
    names = set(killed.files)
    assert {f"{SHARDED_DIR}/.metadata", f"{SHARDED_DIR}/__0_0.distcp"} <= names
    assert f"{SHARDED_DIR}/__1_0.distcp" in names and "state.json" in names
    assert "model.safetensors" not in names  # the weights exist only as shards
    for name in names:
        entry = killed.manifest["files"][name]
        assert len(entry["sha256"]) == 64 and entry["size"] > 0
    (resumed,) = _launch(tmp_path, "--segment", f"{b}:-:7", "--total", "8", name="r")
    for r in range(2):
        assert resumed[r]["outcome"]["first_step"] == 5
        assert resumed[r]["steps"] == straight[r]["steps"][5:]
    (sa, wa), (sb, wb) = _full_state(a, tmp_path), _full_state(b, tmp_path)
    assert sa == sb == 8
    fa, fb = _flat(wa), _flat(wb)
    assert fa.keys() == fb.keys() and any("exp_avg" in k for k in fa)
    for k, v in fa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fb[k]), f"{k}: max |d| = {(v - fb[k]).abs().max()}"
        else:
            assert v == fb[k], k


@pytest.mark.slow
@pytest.mark.gcs
def test_2_ranks_write_their_shards_into_a_gcs_bucket_and_resume_from_it(
    tmp_path: Path, gcs_bucket: str
) -> None:
    """On ``gs://`` (fake-gcs-server) each rank uploads its own shards straight into the
    checkpoint's prefix (what ranks on several machines need: no folder they share); a
    resume from the bucket ends bit-identical to a straight run on local disk."""
    local = tmp_path / "local"
    _, first, rest = _launch(
        tmp_path, "--segment", f"{local}:-:0", "--segment", f"{gcs_bucket}:3:0",
        "--segment", f"{gcs_bucket}:-:7", "--total", "6",
    )
    assert first[0]["outcome"]["last_step"] == 3 and rest[0]["outcome"]["first_step"] == 3
    ckpts = CheckpointStore(open_store(gcs_bucket))
    last = ckpts.latest(verify="full")  # every byte re-read and checked
    assert last is not None and last.step == 6
    assert {f"{SHARDED_DIR}/__0_0.distcp", f"{SHARDED_DIR}/__1_0.distcp"} <= set(last.files)
    (sa, wa), (sb, wb) = _full_state(local, tmp_path), _full_state(gcs_bucket, tmp_path)
    assert sa == sb == 6
    fa, fb = _flat(wa), _flat(wb)
    assert fa.keys() == fb.keys()
    for k, v in fa.items():
        assert torch.equal(v, fb[k]) if isinstance(v, torch.Tensor) else v == fb[k], k


@pytest.mark.slow
def test_2_to_1_reshards_and_continues_the_sample_order(tmp_path: Path) -> None:
    """2 FSDP processes (2 per rank x accumulation 2) to step 3, then 1 plain process
    (4 x accumulation 2, allow_geometry_change): the union of the ranks' samples and the
    single process's continue the global order; the shards load into a plain model."""
    job = tmp_path / "job"
    (first,) = _launch(tmp_path, "--segment", f"{job}:3:0", "--total", "6")
    step, shards = _full_state(job, tmp_path)
    assert step == 3
    with pytest.warns(UserWarning, match="global sample order continues exactly"):
        last = segment(
            job,
            total=6,
            stop_at=None,
            init_seed=9,
            batch_size=4,
            grad_accum=2,
            allow_geometry_change=True,
        )
    assert last["outcome"]["first_step"] == 3 and last["outcome"]["last_step"] == 6
    rank0, rank1 = first[0]["steps"], first[1]["steps"]
    assert [s for s, _ in rank0] == [1, 2, 3]
    got = [ids0[:2] + ids1[:2] + ids0[2:] + ids1[2:] for (_, ids0), (_, ids1) in zip(
        rank0, rank1, strict=True
    )] + [ids for _, ids in last["steps"]]
    order = ResumableSampler(range(N_SAMPLES), seed=DATA_SEED).order
    flat = [i for ids in got for i in ids]
    assert flat == order(0)[:32].tolist() + order(1)[:16].tolist()
    # the step-3 shards, loaded (resharded) into one plain process's model and optimizer
    assert set(shards["model"]) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    plain = build(init_seed=1, batch_size=4, grad_accum=2, total=6, dropout=True, opt="adamw")
    load_sharded(plain["model"], plain["optimizer"], tmp_path / "fetched-job" / SHARDED_DIR)
    for k, v in plain["model"].state_dict().items():
        assert torch.equal(v, shards["model"][k]), k
    assert plain["optimizer"].state_dict()["state"][0]["step"] == 3


def test_a_forged_metadata_pickle_is_refused(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        _SafeReader(tmp_path).read_metadata()
    assert not (tmp_path / "pwned").exists()
