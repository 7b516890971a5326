"""Multi-process training on CPU (gloo): the distributed sample order, per-rank state in
checkpoints, the launcher, and real 2-process runs.

In-process: the global order of ``DistributedResumableSampler`` is the single-process
permutation for every (batch size, accumulation, world size) with the same global batch,
and a position saved on one world size resumes on another; world-size geometry checks;
per-rank RNGs and positions round-trip through a checkpoint; the launcher's environment,
failure handling and signal forwarding (no torch in its children). Real runs
(``tests/jobs/dist_child.py``, 2 ranks through ``colabjob.runner.launch``): a stop that
only rank 1 receives stops both at the same step with one checkpoint; resuming 1 -> 2 -> 1
keeps the global sample order; 2 -> 2 split in two launches is bit-identical; and
``colabjob start --nproc 2``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors
from torch import nn

from colabjob.errors import ConfigError, GeometryChangedError
from colabjob.jobs.data import Geometry, ResumableSampler, check_geometry
from colabjob.jobs.distributed import (
    DistributedResumableSampler,
    World,
    make_distributed_loader,
    unwrap_model,
)
from colabjob.jobs.policy import StopReason
from colabjob.jobs.state.capture import write_snapshot
from colabjob.jobs.state.format import Counters, RankState, Snapshot
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.rng import capture_rng, seed_everything
from colabjob.jobs.state.tracked import Tracked
from colabjob.runner.child_protocol import ChildResult
from colabjob.runner.launch import LaunchResult, _adopt_rank_result, launch, rank_path
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore

from .dist_child import DATA_SEED, N_SAMPLES, segment
from .helpers import NoisyDataset

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
LAUNCH_TIMEOUT = 150.0  # a deadlock fails the test instead of hanging it


# ---- the distributed sample order -------------------------------------------------------


def _global_steps(b: int, a: int, w: int, n: int, epochs: int) -> list[list[int]]:
    """Every optimizer step's samples in order: micro-batch by micro-batch, rank by rank."""
    samplers = [
        DistributedResumableSampler(
            range(n), seed=5, batch_size=b, grad_accum=a, rank=r, world_size=w
        )
        for r in range(w)
    ]
    steps = []
    for epoch in range(epochs):
        streams = []
        for s in samplers:
            s.set_epoch(epoch)
            indices = list(s)
            assert len(indices) == len(s)
            streams.append([indices[i : i + b] for i in range(0, len(indices), b)])
        for k in range(0, len(streams[0]), a):
            steps.append([i for m in range(a) for r in range(w) for i in streams[r][k + m]])
    return steps


@pytest.mark.parametrize(("b", "a", "w"), [(4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4), (8, 1, 1)])
def test_global_order_is_the_single_process_permutation(b: int, a: int, w: int) -> None:
    n = 30  # 3 global batches of 8 per epoch; the last 6 samples of each epoch are skipped
    steps = _global_steps(b, a, w, n, epochs=2)
    plain = ResumableSampler(range(n), seed=5)
    expected = [plain.order(e)[i : i + 8].tolist() for e in range(2) for i in range(0, 24, 8)]
    assert steps == expected


def test_a_position_resumes_on_another_world_size() -> None:
    """1 process (4 x accumulation 2) for 5 steps, then 2 processes (4 each) for 5 more:
    the union over ranks per step continues the single-process order across an epoch."""
    data = NoisyDataset(N_SAMPLES)  # 4 steps of 8 per epoch

    def ids(batch: dict[str, Any]) -> list[int]:
        return list(batch["index"].tolist())

    straight = make_distributed_loader(data, batch_size=4, grad_accum=2, seed=DATA_SEED)
    flat = [i for _ in range(3) for batch in straight for i in ids(batch)]
    one = make_distributed_loader(data, batch_size=4, grad_accum=2, seed=DATA_SEED)
    batches = (batch for _ in range(2) for batch in one)  # epoch after epoch
    got = [i for _ in range(2 * 5) for i in ids(next(batches))]
    state = one.state_dict()
    assert state["sampler"]["epoch"] == 1 and state["sampler"]["offset"] == 8
    ranks = []
    for r in range(2):
        loader = make_distributed_loader(
            data, batch_size=4, seed=DATA_SEED, world=World(rank=r, world_size=2)
        )
        loader.load_state_dict(json.loads(json.dumps(state)))
        ranks.append([ids(batch) for _ in range(2) for batch in loader][:5])
    for step in range(5):
        got += ranks[0][step] + ranks[1][step]
    assert got == flat[: 8 * 10]
    assert len(set(got[32:64])) == 32  # epoch 1: nothing twice, across the resume


def test_worker_prefetch_does_not_move_the_saved_position() -> None:
    """With 2 worker processes prefetching ahead, the state is where the loop stands."""
    data = NoisyDataset(N_SAMPLES)
    world = World(rank=1, world_size=2)
    first = make_distributed_loader(data, batch_size=2, seed=3, num_workers=2, world=world)
    it = iter(first)
    seen = [next(it)["index"].tolist() for _ in range(3)]
    state = first.state_dict()
    del it
    assert state["sampler"]["offset"] == 3 * 2 * 2
    again = make_distributed_loader(data, batch_size=2, seed=3, world=world)
    again.load_state_dict(state)
    whole = make_distributed_loader(data, batch_size=2, seed=3, world=world)
    expected = [b["index"].tolist() for b in whole]
    assert seen + [b["index"].tolist() for b in again] == expected


def test_loader_built_for_another_geometry_is_refused() -> None:
    from colabjob.jobs.distributed import check_loader

    loader = make_distributed_loader(range(8), batch_size=2, seed=0, grad_accum=2)
    with pytest.raises(ConfigError, match="grad_accum=2 on 1"):
        check_loader(loader, grad_accum=1, world_size=1)
    with pytest.warns(UserWarning, match="not a distributed one"):
        check_loader(object(), grad_accum=1, world_size=2)


def test_world_size_change_needs_the_flag_and_says_what_keeps_the_order() -> None:
    saved = Geometry(batch_size=4, grad_accum=2, world_size=1)
    doubled = Geometry(batch_size=4, grad_accum=2, world_size=2)
    with pytest.raises(GeometryChangedError) as info:
        check_geometry(saved, doubled, allow_change=False)
    assert "batch_size * grad_accum = 4" in str(info.value)
    halved = Geometry(batch_size=4, grad_accum=1, world_size=2)  # the same 8 samples a step
    with pytest.raises(GeometryChangedError, match="global batch is unchanged"):
        check_geometry(saved, halved, allow_change=False)
    with pytest.warns(UserWarning, match="global sample order continues exactly"):
        check_geometry(saved, halved, allow_change=True)
    with pytest.warns(UserWarning, match="consumes 16 samples instead of 8"):
        check_geometry(saved, doubled, allow_change=True)


# ---- per-rank state in a checkpoint ----------------------------------------------------------


def test_each_rank_gets_its_own_rng_and_position(tmp_path: Path) -> None:
    def rng_of(seed: int) -> Any:
        seed_everything(seed)
        return capture_rng()

    snap = Snapshot(
        counters=Counters(step=3),
        rng=rng_of(0),
        data={"pos": 0},
        ranks=(RankState(rng=rng_of(1), data={"pos": 1, "t": torch.arange(3)}),),
    )
    write_snapshot(snap, tmp_path)

    class Position:
        def __init__(self) -> None:
            self.state: Any = None

        def state_dict(self) -> Any:
            return self.state

        def load_state_dict(self, state: Any) -> None:
            self.state = state

    expected = {}
    for seed in (0, 1):
        seed_everything(seed)
        expected[seed] = torch.rand(4)
    for rank, seed in ((0, 0), (1, 1)):
        loader = Position()
        got = restore(tmp_path, Tracked(loader=loader), rank=rank)
        assert (got.world_size, got.rng_found) == (2, True)
        assert torch.equal(torch.rand(4), expected[seed]), f"rank {rank} got another RNG"
        assert loader.state["pos"] == rank
    assert torch.equal(loader.state["t"], torch.arange(3))
    seed_everything(7)
    after = torch.rand(4)
    seed_everything(7)
    loader = Position()
    got = restore(tmp_path, Tracked(loader=loader), rank=2)  # a rank the writing run did not have
    assert (got.rng_found, loader.state) == (False, {"pos": 0})
    assert torch.equal(torch.rand(4), after)  # its RNGs untouched (the Session seeds them)


def test_unwrap_model_strips_wrappers() -> None:
    inner = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(inner)) is inner
    assert unwrap_model(inner) is inner and unwrap_model(None) is None


def test_leaving_the_group_frees_a_ddp_held_in_a_cycle_first(tmp_path: Path) -> None:
    """A DistributedDataParallel kept alive only by a reference cycle (a Session that
    tracked it) must go before the group does: left to interpreter finalization, gloo
    aborted about one exit in fifteen ("terminate called without an active exception")."""
    import gc
    import weakref

    import torch.distributed as dist

    from colabjob.jobs.distributed import in_process_group, shutdown_distributed

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    gc.disable()  # only shutdown_distributed may collect the cycle
    try:
        holder: dict[str, Any] = {"ddp": nn.parallel.DistributedDataParallel(nn.Linear(2, 2))}
        holder["self"] = holder
        alive = weakref.ref(holder["ddp"])
        del holder
        assert alive() is not None  # unreachable, but not yet collected
        shutdown_distributed()
        assert alive() is None and not in_process_group()
    finally:
        gc.enable()
        if in_process_group():
            dist.destroy_process_group()


# ---- the launcher (children without torch: fast) ---------------------------------------------

ENV_DUMP = (
    "import json, os, sys; keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', "
    "'MASTER_PORT'); json.dump({k: os.environ[k] for k in keys}, "
    "open(sys.argv[1] + os.environ['RANK'], 'w'))"
)


def test_launch_sets_the_torchrun_environment(tmp_path: Path) -> None:
    out = launch([sys.executable, "-c", ENV_DUMP, str(tmp_path / "env")], nproc=2, timeout=60)
    assert (out.exit_code, out.returncodes, out.failed_rank) == (0, (0, 0), None)
    envs = [json.loads((tmp_path / f"env{r}").read_text()) for r in range(2)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ]
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert envs[0]["MASTER_ADDR"] == "127.0.0.1"


def test_a_failed_rank_ends_the_others(tmp_path: Path) -> None:
    """Rank 1 fails; rank 0 would wait forever (a peer in a collective): it is terminated."""
    code = "import os, time\nif os.environ['RANK'] == '1': raise SystemExit(3)\ntime.sleep(600)"
    out = launch([sys.executable, "-c", code], nproc=2, timeout=60, grace=5.0)
    assert (out.exit_code, out.failed_rank, out.timed_out) == (3, 1, False)
    assert out.returncodes == (-signal.SIGTERM, 3)


def test_signals_reach_every_rank_once(tmp_path: Path) -> None:
    """SIGUSR1 to the launcher reaches both ranks (each counts it and exits 0)."""
    code = (
        "import os, signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda *a: got.append(1))\n"
        "open(sys.argv[1] + os.environ['RANK'], 'w').close()\n"
        "while not got: time.sleep(0.01)\n"
        "time.sleep(0.2)\n"
        "raise SystemExit(0 if len(got) == 1 else 9)\n"
    )
    cmd = [sys.executable, "-m", "colabjob.runner.launch", "--nproc", "2", "--"]
    proc = subprocess.Popen([*cmd, sys.executable, "-c", code, str(tmp_path / "ready")], env=ENV)
    try:
        for _ in range(3000):  # until both ranks installed their handler
            if all((tmp_path / f"ready{r}").exists() for r in range(2)):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_failed_ranks_result_replaces_a_missing_one(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    failed = ChildResult(exit_code=1, error="RuntimeError: boom", retryable=True)
    rank_path(result, 1).write_text(failed.to_json())
    _adopt_rank_result(result, LaunchResult(exit_code=1, returncodes=(-9, 1), failed_rank=1))
    got = ChildResult.from_json(result.read_text())
    assert (got.error, got.retryable) == ("rank 1: RuntimeError: boom", True)


# ---- real two-process runs -------------------------------------------------------------------


def _launch(tmp: Path, mode: str, *args: str, name: str = "out") -> list[list[dict[str, Any]]]:
    """Run dist_child on 2 ranks; ``[segment][rank]`` results."""
    out = tmp / name
    cmd = [sys.executable, "-m", "tests.jobs.dist_child", mode, str(out), *args]
    got = launch(cmd, nproc=2, env=ENV, cwd=REPO, timeout=LAUNCH_TIMEOUT)
    assert got.exit_code == 0, got
    n = len(list(tmp.glob(f"{name}.*.rank0.json")))
    return [
        [json.loads((tmp / f"{name}.{i}.rank{r}.json").read_text()) for r in range(2)]
        for i in range(n)
    ]


def _weights(root: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpts = CheckpointStore(open_store(root))
    info = ckpts.latest()
    assert info is not None
    return info.step, load_tensors(ckpts.read(info, "model.safetensors"))


def _state_doc(root: Path) -> dict[str, Any]:
    ckpts = CheckpointStore(open_store(root))
    info = ckpts.latest()
    assert info is not None
    doc: dict[str, Any] = json.loads(ckpts.read(info, "state.json"))
    return doc


@pytest.mark.slow
def test_a_stop_only_rank_1_receives_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """Rank 1 alone gets SIGUSR1 during step 3's first micro-batch (accumulation 2): both
    ranks stop after step 3, and the job has one committed checkpoint, at step 3."""
    store = tmp_path / "job"
    (result,) = _launch(
        tmp_path, "signal", "--segment", str(store), "--total", "20", "--signal-after", "5"
    )
    for r in range(2):
        assert result[r]["outcome"]["stop_reason"] == "signal"
        assert result[r]["outcome"]["last_step"] == 3
        assert [s[0] for s in result[r]["steps"]] == [1, 2, 3]
    ckpts = CheckpointStore(open_store(store)).list()
    assert [c.step for c in ckpts] == [3]
    doc = _state_doc(store)
    assert doc["world_size"] == 2 and doc["counters"]["samples_seen"] == 3 * 8
    assert doc["ranks"]["1"]["data"]["sampler"]["offset"] == 24
    record = load_record(open_store(store))
    assert record.state is JobState.SUSPENDED
    assert record.history[-1].stop_reason is StopReason.SIGNAL
    assert record.history[-1].last_step == 3


@pytest.mark.slow
def test_resume_1_to_2_to_1_keeps_the_global_sample_order(tmp_path: Path) -> None:
    """A straight single-process run (4 x accumulation 2) against the same job run as
    1 process to step 3, 2 processes (4 each, no accumulation) to step 7, 1 process to 10:
    every step reads the same samples in the same order, across two epoch ends. Without
    dropout the weights agree up to floating-point rounding (reduction order differs)."""
    common: dict[str, Any] = {
        "total": 10,
        "batch_size": 4,
        "grad_accum": 2,
        "dropout": False,
        "opt": "sgd",
    }
    straight = segment(tmp_path / "a", stop_at=None, init_seed=0, **common)
    split = tmp_path / "b"
    first = segment(split, stop_at=3, init_seed=0, **common)
    (middle,) = _launch(
        tmp_path,
        "segments",
        *("--segment", f"{split}:7:2", "--total", "10", "--batch-size", "4"),
        *("--grad-accum", "1", "--no-dropout", "--opt", "sgd", "--allow-geometry-change"),
    )
    with pytest.warns(UserWarning, match="global sample order continues exactly"):
        last = segment(split, stop_at=None, init_seed=3, allow_geometry_change=True, **common)
    rank0, rank1 = middle[0]["steps"], middle[1]["steps"]
    assert [s for s, _ in rank0] == [s for s, _ in rank1] == [4, 5, 6, 7]
    got = (
        first["steps"]
        + [[s, ids0 + ids1] for (s, ids0), (_, ids1) in zip(rank0, rank1, strict=True)]
        + last["steps"]
    )
    assert got == straight["steps"]
    order = ResumableSampler(range(N_SAMPLES), seed=DATA_SEED).order
    flat = [i for _, ids in straight["steps"] for i in ids]
    assert flat == order(0)[:32].tolist() + order(1)[:32].tolist() + order(2)[:16].tolist()
    assert middle[0]["outcome"]["first_step"] == 3 and last["outcome"]["first_step"] == 7
    (sa, wa), (sb, wb) = _weights(tmp_path / "a"), _weights(split)
    assert sa == sb == 10 and wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["map", "shuffled"])
def test_2_to_2_split_is_bit_identical(tmp_path: Path, data: str) -> None:
    """Dropout (each rank its own RNG stream), AdamW, warmup, accumulation 2: a straight
    2-process run against the same job stopped by rank 0 at step 3 and resumed in new
    processes: same samples per step, bit-identical final weights. ``shuffled``: a
    ``ShuffledStream`` over 6 shards split across the 2 ranks (each rank its own buffer),
    over more than one epoch."""
    a, b = tmp_path / "a", tmp_path / "b"
    straight, first = _launch(
        tmp_path, "segments", "--segment", f"{a}:-:0", "--segment", f"{b}:3:0", "--total", "8",
        "--data", data,
    )
    (second,) = _launch(
        tmp_path, "segments", "--segment", f"{b}:-:5", "--total", "8", "--data", data,
        name="resumed",
    )
    if data == "shuffled":  # in epoch 0 (steps 1-4) the ranks read different shards, shuffled
        ids = [[i for _, w in straight[r]["steps"][:4] for i in w] for r in range(2)]
        assert not set(ids[0]) & set(ids[1]) and ids[0] != sorted(ids[0])
    for r in range(2):
        assert first[r]["outcome"]["stop_reason"] == "budget"  # rank 0's, agreed by rank 1
        assert first[r]["steps"] + second[r]["steps"] == straight[r]["steps"]
    (sa, wa), (sb, wb) = _weights(a), _weights(b)
    assert sa == sb == 8 and wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max |dw| = {(wa[k] - wb[k]).abs().max()}"


@pytest.mark.slow
def test_2_ranks_fall_back_together_past_a_checkpoint_that_does_not_load(tmp_path: Path) -> None:
    """The newest checkpoint of a 2-process job verifies (its manifest was rewritten to
    match) but its weights do not parse: rank 0 quarantines it, both ranks load the one
    before in the same processes, and the run ends bit-identical to a straight one."""
    a, b = tmp_path / "a", tmp_path / "b"
    straight, first = _launch(
        tmp_path, "segments", "--segment", f"{a}:-:0", "--segment", f"{b}:3:0", "--total", "8"
    )
    older, newest = CheckpointStore(open_store(b)).list()[-2:]
    assert (older.step, newest.step) == (2, 3)
    bad = b"\x00" * 32 + b"not a safetensors file"
    (b / newest.prefix / "model.safetensors").write_bytes(bad)
    manifest = b / newest.prefix / "manifest.json"
    doc = json.loads(manifest.read_bytes())
    digest = hashlib.sha256(bad).hexdigest()
    doc["files"]["model.safetensors"] = {"size": len(bad), "sha256": digest}
    manifest.write_bytes(json.dumps(doc, indent=1, sort_keys=True).encode())

    (second,) = _launch(
        tmp_path, "segments", "--segment", f"{b}:-:5", "--total", "8", name="resumed"
    )
    for r in range(2):
        assert second[r]["outcome"]["first_step"] == 2
        assert first[r]["steps"][:2] + second[r]["steps"] == straight[r]["steps"]
    reason = json.loads((b / "quarantine" / newest.dirname / "reason.json").read_text())
    assert reason["problem"].startswith("does not load")
    (sa, wa), (sb, wb) = _weights(a), _weights(b)
    assert sa == sb == 8
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


TRAIN = """
import torch
from torch import nn
from colabjob.jobs.distributed import World, make_distributed_loader


def main(session, spec):
    world = World.current()
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    ddp = nn.parallel.DistributedDataParallel(model) if world.distributed else model
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    loader = make_distributed_loader(torch.utils.data.TensorDataset(x, y), batch_size=2, seed=0)
    session.track(model=ddp, optimizer=opt, loader=loader)
    for x, y in session.batches():
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if session.step(loss=loss):
            break
    with open(spec.job.args["marker"] + str(world.rank), "w") as f:
        f.write(str(world.world_size))
"""

SPEC = """
job:
  name: ddp
  kind: python
  entrypoint: ddp_train:main
  args: {{marker: {marker}}}
training: {{max_steps: 6, log_every_steps: 1}}
checkpoint: {{every_steps: 2, every_minutes: null}}
budget: {{platform: local}}
"""


@pytest.mark.slow
def test_cli_start_with_nproc_2(tmp_path: Path) -> None:
    from tests.cli.builders import run_cli

    (tmp_path / "ddp_train.py").write_text(TRAIN)
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.format(marker=tmp_path / "rank"))
    url = tmp_path / "job"
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    out = run_cli(
        "start", str(spec), "--storage", str(url), "--nproc", "2", "--progress", "none", env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "2"]
    record = load_record(open_store(url))
    assert record.state is JobState.COMPLETED and record.last_step == 6
    doc = _state_doc(url)
    assert doc["world_size"] == 2 and doc["counters"]["samples_seen"] == 6 * 4
    assert "module." not in " ".join(doc["model"]["keys"])
