"""The Trainer-based kinds on several processes (gloo, CPU): ``scratch`` and ``lora`` with a
tiny GPT-2 (dropout on, accumulation 2) on 2 ranks through ``colabjob.runner.launch``.

A stop that only rank 1 decides (its policy says ``signal`` after step 3; rank 0's never
stops) stops both ranks at step 3 with one committed checkpoint holding both ranks' RNGs and
loader positions; resumed on 2 ranks the job ends bit-identical to an uninterrupted 2-rank
run. The 2-rank scratch checkpoint resumes on 1 process with ``allow_geometry_change`` and
continues the global sample order. A user's Trainer script with ``colabjob.hf.resumable``
(``hf_resumable_child.py``) stops on both ranks when rank 1 alone gets SIGUSR1 and resumes
bit-identical. ``colabjob start --nproc 2`` runs a scratch job to completion.

As a script (``python -m tests.jobs.test_hf_distributed KIND DATA MODEL OUT STORE:STOP ...``,
one per rank) it runs each segment in order (``STOP``: see ``_rank_segment``; ``KIND+fsdp``
with ``training.fsdp``) with a hand-built context and writes ``OUT.<i>.rank<r>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors

from colabjob.jobs.context import SegmentContext
from colabjob.jobs.data.tokenizer import TOKENIZER_KEY
from colabjob.jobs.kinds import run_kind
from colabjob.jobs.policy import StopReason
from colabjob.runner.launch import launch
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.jobs.kind_fixtures import (
    KillAfter,
    StopAfter,
    make_ctx,
    sigkill_spec,
    tiny_model_dir,
    write_text_data,
)
from tests.jobs.test_distributed import ENV, LAUNCH_TIMEOUT, REPO

STEPS = 8  # sigkill_spec: 8 steps of 2 x accumulation 2 per rank


class SignalAfter(StopAfter):
    """Stops with ``signal`` (as a SIGUSR1 would) after ``n`` optimizer steps."""

    def should_stop(self) -> StopReason | None:
        return StopReason.SIGNAL if super().should_stop() else None


def _spec(kind: str, data: Path, model: Path) -> Any:
    """``KIND[+fsdp][+merged]``: with ``training.fsdp``; a merged LoRA artifact."""
    base, *options = kind.split("+")
    spec = sigkill_spec(base, model_dir=model, data_path=data, fsdp="fsdp" in options)
    if "merged" in options:
        spec = dataclasses.replace(
            spec, checkpoint=dataclasses.replace(spec.checkpoint, final_artifact="merged")
        )
    return spec


def _rank_segment(spec: Any, store: Path, stop: str, rank: int) -> dict[str, Any]:
    """One segment on this rank. ``stop``: ``-`` none; ``N``: rank 1 alone stops after step
    N; ``kN``: rank 0 SIGKILLs itself after step N, once a checkpoint every 2 steps has
    been committed (the launch then fails); a trailing ``g``: allow a geometry change."""
    geometry = stop.endswith("g")
    stop = stop.removesuffix("g")
    kill = stop.startswith("k")
    if rank == 0:
        policy = KillAfter(int(stop[1:])) if kill else StopAfter(None)
        ctx = make_ctx(store, policy, max_steps=STEPS, every_steps=2 if kill else None,
                       allow_geometry_change=geometry)
    else:  # a follower: it never commits (its fence refuses), it only decides to stop
        s = open_store(str(store))
        ctx = SegmentContext(
            store=s,
            checkpoints=CheckpointStore(s, fence=lambda: 2**62),
            policy=SignalAfter(None if stop == "-" or kill else int(stop)),
            max_steps=STEPS,
            every_steps=2 if kill else None,
            allow_geometry_change=geometry,
        )
    return dataclasses.asdict(run_kind(spec, ctx))


def _child(argv: list[str]) -> None:
    import torch.distributed as dist

    from colabjob.jobs.distributed import init_distributed, shutdown_distributed

    kind, data, model, out, segments = argv[0], Path(argv[1]), Path(argv[2]), argv[3], argv[4:]
    world = init_distributed()
    first = open_store(segments[0].rsplit(":", 1)[0])
    for i, seg in enumerate(segments):
        store, stop = seg.rsplit(":", 1)
        target = open_store(store)
        if world.is_main and first.exists(TOKENIZER_KEY) and not target.exists(TOKENIZER_KEY):
            # BPE training is not reproducible: the jobs compared share one tokenizer
            target.write_bytes(TOKENIZER_KEY, first.read_bytes(TOKENIZER_KEY))
        dist.barrier()
        spec = _spec(kind, data, model)
        got = _rank_segment(spec, Path(store), stop, world.rank)
        Path(f"{out}.{i}.rank{world.rank}.json").write_text(json.dumps(got))
    shutdown_distributed()


# ---- the tests ---------------------------------------------------------------------------


def _launch(
    tmp: Path, kind: str, data: Path, model: Path, *segments: str, name: str,
    killed: bool = False,
) -> list[list[dict[str, Any]]]:
    """``[segment][rank]`` outcomes of one 2-rank launch (``killed``: a rank SIGKILLs
    itself in the last segment, which then has no outcome)."""
    out = tmp / name
    cmd = [sys.executable, "-m", "tests.jobs.test_hf_distributed", kind, str(data), str(model)]
    cmd += [str(out), *segments]
    got = launch(cmd, nproc=2, env=ENV, cwd=REPO, timeout=LAUNCH_TIMEOUT)
    assert (got.exit_code != 0) if killed else (got.exit_code == 0), got
    if killed:
        segments = segments[:-1]
    return [
        [json.loads((tmp / f"{name}.{i}.rank{r}.json").read_text()) for r in range(2)]
        for i in range(len(segments))
    ]


def _latest(root: Path) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
    ckpts = CheckpointStore(open_store(str(root)))
    info = ckpts.latest()
    assert info is not None
    doc = json.loads(ckpts.read(info, "state.json"))
    return info.step, doc, load_tensors(ckpts.read(info, "model.safetensors"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    data = write_text_data(root / "data")
    return {"data": data, "model": tiny_model_dir(root / "model", data)}


def _stop_and_resume(tmp: Path, kind: str, assets: dict[str, Path]) -> dict[str, Any]:
    """A straight 2-rank run against one that rank 1 alone stops after step 3, resumed on
    2 ranks: checks the stop, the one checkpoint, and bit-identical final weights. Returns
    the stopped run's checkpoint document (its copy is at ``tmp / "copy"``)."""
    data, model = assets["data"], assets["model"]
    straight, split = tmp / "straight", tmp / "split"
    whole, first = _launch(tmp, kind, data, model, f"{straight}:-", f"{split}:3", name="a")
    for r in range(2):
        assert whole[r]["completed"] and whole[r]["last_step"] == STEPS
        assert first[r]["stop_reason"] == "signal"  # rank 1's, agreed by rank 0
        assert (first[r]["first_step"], first[r]["last_step"]) == (0, 3)
    assert [c.step for c in CheckpointStore(open_store(str(split))).list()] == [3]
    step, doc, _ = _latest(split)
    assert step == 3 and doc["world_size"] == 2
    assert doc["geometry"] == {"batch_size": 2, "grad_accum": 2, "world_size": 2}
    assert doc["counters"]["samples_seen"] == 3 * 8
    assert doc["data"]["sampler"]["offset"] == doc["ranks"]["1"]["data"]["sampler"]["offset"]
    assert doc["ranks"]["1"]["rng"] is not None  # HF seeds every rank alike; still saved
    shutil.copytree(split, tmp / "copy")

    (rest,) = _launch(tmp, kind, data, model, f"{split}:-", name="b")
    for r in range(2):
        assert (rest[r]["first_step"], rest[r]["last_step"]) == (3, STEPS)
        assert rest[r]["completed"]
    (sa, da, wa), (sb, db, wb) = _latest(straight), _latest(split)
    assert sa == sb == STEPS and wa.keys() == wb.keys()
    assert da["counters"] == db["counters"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max |dw| = {(wa[k] - wb[k]).abs().max()}"
    return doc


@pytest.mark.slow
def test_scratch_on_two_ranks_stops_together_and_resumes_bit_identical(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    _stop_and_resume(tmp_path, "scratch", assets)
    # the 2-rank checkpoint on one process: the global sample position carries over
    with pytest.warns(UserWarning, match="world_size 2 -> 1"):
        one = run_kind(
            _spec("scratch", assets["data"], assets["model"]),
            make_ctx(tmp_path / "copy", StopAfter(1), max_steps=STEPS, allow_geometry_change=True),
        )
    assert (one.first_step, one.last_step, one.stop_reason) == (3, 4, "budget")
    step, doc, _ = _latest(tmp_path / "copy")
    assert step == 4 and "ranks" not in doc and doc["geometry"]["world_size"] == 1
    assert doc["counters"]["samples_seen"] == 3 * 8 + 4
    assert doc["data"]["sampler"]["offset"] == 3 * 8 + 4


@pytest.mark.slow
def test_lora_on_two_ranks_resumes_bit_identical(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    doc = _stop_and_resume(tmp_path, "lora", assets)
    assert all("lora_" in k for k in doc["model"]["keys"])  # the adapters only, unwrapped


def _launch_resumable(tmp: Path, url: Path, assets: dict[str, Path], signal_after: int,
                      name: str, *options: str) -> list[dict[str, Any]]:
    """Each rank's outcome of one 2-rank launch of a user's script using ``resumable()``
    (``options``: ``fsdp`` for a model sharded as it loads)."""
    out = tmp / name
    cmd = [sys.executable, "-m", "tests.jobs.hf_resumable_child", str(url),
           str(assets["model"]), str(assets["data"]), str(out), str(signal_after), *options]
    got = launch(cmd, nproc=2, env=ENV, cwd=REPO, timeout=LAUNCH_TIMEOUT)
    assert got.exit_code == 0, got
    return [json.loads((tmp / f"{name}.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_resumable_script_on_two_ranks_stops_together_and_resumes_bit_identical(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """A user's Trainer script plus ``resumable()`` under a torchrun-style launch: SIGUSR1
    to rank 1 alone stops both ranks at one step with one final checkpoint (the job is
    SUSPENDED); resumed on 2 ranks it ends bit-identical to an uninterrupted 2-rank run."""
    from colabjob.jobs.demo import compare_final_weights
    from colabjob.runner.record import load_record
    from colabjob.runner.states import JobState

    straight, split = tmp_path / "straight", tmp_path / "split"
    whole = _launch_resumable(tmp_path, straight, assets, 0, "a")
    assert all(o["completed"] and o["last_step"] == 6 for o in whole)
    first = _launch_resumable(tmp_path, split, assets, 3, "b")
    stopped = {o["last_step"] for o in first}
    assert len(stopped) == 1 and stopped <= {3, 4}  # the same step on both ranks
    assert all(o["stop_reason"] == "signal" for o in first)
    step = stopped.pop()
    assert CheckpointStore(open_store(str(split))).latest().step == step  # type: ignore[union-attr]
    record = load_record(open_store(str(split)))
    assert record.state is JobState.SUSPENDED
    assert record.history[-1].stop_reason is StopReason.SIGNAL
    _, doc, weights = _latest(split)
    assert doc["world_size"] == 2 and set(doc["ranks"]) == {"1"}  # rank 0: top level
    assert not any(k.startswith("module.") for k in weights)
    rest = _launch_resumable(tmp_path, split, assets, 0, "c")
    assert all((o["first_step"], o["last_step"], o["completed"]) == (step, 6, True) for o in rest)
    assert compare_final_weights(straight, split)


CLI_SPEC = """
job: {{name: hfdist, kind: scratch}}
model:
  architecture: gpt2
  config: {{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 32}}
tokenizer: {{train: {{vocab_size: 300, min_frequency: 1}}}}
data: {{source: {data}, seq_len: 32}}
training: {{max_steps: 4, batch_size: 2, grad_accum: 2, lr: 1.0e-3, seed: 5, log_every_steps: 1}}
checkpoint: {{every_steps: 2, every_minutes: null}}
budget: {{platform: local}}
"""


@pytest.mark.slow
def test_cli_start_nproc_2_runs_a_scratch_job(tmp_path: Path) -> None:
    from colabjob.jobs.kinds.final import fetch_final
    from colabjob.runner.record import load_record
    from colabjob.runner.states import JobState
    from tests.cli.builders import run_cli

    spec = tmp_path / "job.yaml"
    spec.write_text(CLI_SPEC.format(data=write_text_data(tmp_path / "data")))
    url = tmp_path / "job"
    out = run_cli(
        "start", str(spec), "--storage", str(url), "--nproc", "2", "--progress", "none",
        timeout=LAUNCH_TIMEOUT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    record = load_record(open_store(str(url)))
    assert record.state is JobState.COMPLETED and record.last_step == 4
    assert [c.step for c in CheckpointStore(open_store(str(url))).list()] == [2, 4]
    _, doc, weights = _latest(url)
    assert doc["world_size"] == 2 and doc["counters"]["samples_seen"] == 4 * 8
    assert not any(k.startswith("module.") for k in weights)  # the unwrapped model
    info = fetch_final(open_store(str(url)), tmp_path / "final")
    assert info is not None and info.step == 4 and (tmp_path / "final" / "config.json").exists()


if __name__ == "__main__":
    _child(sys.argv[1:])
