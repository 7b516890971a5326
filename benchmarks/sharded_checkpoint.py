"""What a sharded (FSDP2) checkpoint costs through the Session API vs ``dcp.save`` by hand.

Two CPU processes (gloo on 127.0.0.1, started by ``colabjob.runner.launch``) train a
50.4 M-parameter model (12 square 2048-wide Linear layers, each ``fully_shard``-ed, then the
root) with AdamW; one step is taken first so the optimizer's moments exist. A checkpoint is
then ~600 MB over both ranks (weights + two AdamW moments), ~300 MB written by each.

- ``dcp``: the baseline, what a user writes by hand: every rank calls
  ``dcp.save(get_state_dict(model, opt))`` into a local directory (DCP's
  ``FileSystemWriter``, which fsyncs); the time is the slowest rank's (max over ranks),
  median of ``DCP_RUNS`` runs taken half before the Session part and half after, and of
  ``SYNC_SAVES`` more, each just before one of the synchronous saves below (the machine's
  load drifts; both sides of each ratio see the same).
- ``ours``: ``colabjob.session()`` on a local job directory, checkpointing every 2 steps.
  *Stall*: on rank 0, the wall time of the ``s.step()`` that starts a checkpoint minus a
  plain ``s.step()``'s (median): every rank takes ``get_state_dict`` and one host copy of
  its shards, then ``dcp.async_save`` writes them (hashing as it writes) straight into the
  checkpoint's prefix on a thread.
- *The protocol's overhead* (``commit_vs_dcp``, the issue's "commit time / dcp.save alone"):
  ``s.save(final=True)``, the whole commit run synchronously through the Session
  (``get_state_dict``, the DCP write hashed as it streams, ``state.json``, size checks,
  manifest, retention), slowest rank, median of ``SYNC_SAVES``, each started once no write
  is in flight, under the baseline's conditions: nothing else running. Ratio and baseline
  differ only by what the protocol adds to a bare ``dcp.save``.
- *Commit under training* (``commit_under_training_vs_dcp``): for the background
  checkpoints, from the ``s.step()`` that starts one to its manifest being committed (that
  ``s.step()``'s wall time plus the commit's ``CheckpointInfo.stats.total_seconds``), while
  both ranks keep training. With 2 ranks on a 2-core machine the training steps take the
  cores the write and its hashing need, so this figure measures CPU contention more than the
  protocol; it is kept as its own key, not as the overhead.

Ratios are against ``dcp`` (issue 13 targets: stall <= 0.25x, commit <= 1.25x). Reports only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

WIDTH, LAYERS, BATCH = 2048, 12, 4
CHECKPOINTS = 3  # background checkpoints measured
SYNC_SAVES = 3  # then synchronous ones (the protocol alone), one after another
DCP_RUNS = 4  # baseline saves: half before the Session part, half after
LAUNCH_TIMEOUT = 900.0


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> float:
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(step * 16 + rank))
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def build(rank: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same weights on every rank (FSDP2 does not broadcast them)
    model = Stack()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, opt, 0, rank)  # AdamW allocates its moments on the first step
    return model, opt


def slowest(seconds: float) -> float:
    """The max of ``seconds`` over the ranks (every rank calls this)."""
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def bench_dcp(
    model: nn.Module, opt: torch.optim.Optimizer, scratch: Path, runs: int, tag: str
) -> list[float]:
    """Synchronous ``dcp.save`` of the model's and optimizer's shards, slowest rank."""
    times = []
    for i in range(runs):
        path = scratch / f"dcp-{tag}-{i}"
        dist.barrier()
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optimizer": osd}, storage_writer=dcp.FileSystemWriter(path))
        times.append(slowest(time.perf_counter() - t0))
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
    return times


def _agree(done: bool) -> bool:
    """Rank 0's ``done`` on every rank (the ranks must take the same number of steps)."""
    t = torch.tensor([int(done)])
    dist.broadcast(t, src=0)
    return bool(t.item())


def _parts(info: Any) -> list[float]:
    return [info.stats.write_seconds, info.stats.upload_seconds, info.stats.commit_seconds]


def bench_ours(model: nn.Module, opt: torch.optim.Optimizer, scratch: Path) -> dict[str, Any]:
    import colabjob

    rank = dist.get_rank()
    stalls: list[float] = []  # s.step() wall time of the steps that started a checkpoint
    plain: list[float] = []  # s.step() wall time of the others
    train: list[float] = []
    commits: list[Any] = []
    with colabjob.session(
        scratch / "job",
        every_steps=2,
        log=None,
        platform="local",
        staging_dir=scratch / "stage",
    ) as s:
        s.track(model=model, optimizer=opt, batch_size=BATCH)
        ckpts = s.ctx.checkpoints
        step = 0
        while not _agree(len(stalls) >= CHECKPOINTS):
            step += 1
            t0 = time.perf_counter()
            loss = train_step(model, opt, step, rank)
            t1 = time.perf_counter()
            before = ckpts.pending
            s.step(loss=loss)
            t2 = time.perf_counter()
            train.append(t1 - t0)
            if rank == 0 and ckpts.pending is not before:  # this step() started a checkpoint
                stalls.append(t2 - t1)
                commits.append(ckpts.pending)
            else:
                plain.append(t2 - t1)
        for p in commits:  # the last background write done on every rank (DCP's last
            p.wait()  # collective precedes rank 0's commit): the final saves start idle
        finals, final_infos, between = [], [], []
        for i in range(SYNC_SAVES):  # each beside a baseline save: the same load on both
            between += bench_dcp(model, opt, scratch, 1, f"between-{i}")
            dist.barrier()
            t0 = time.perf_counter()
            final_infos.append(s.save(final=True))
            finals.append(slowest(time.perf_counter() - t0))
    infos = [p.wait() for p in commits]  # committed by now (the final save waited for them)
    latest = ckpts.latest() if rank == 0 else None
    return {
        "stalls": stalls,
        "plain": plain,
        "train": train,
        "commits": [st + i.stats.total_seconds for st, i in zip(stalls, infos, strict=True)],
        "background": [i.stats.total_seconds for i in infos],
        "parts": [_parts(i) for i in infos],
        "finals": finals,
        "between": between,
        "final_parts": [_parts(i) for i in final_infos if i is not None],  # rank 0's
        "nbytes": sum(int(f["size"]) for f in latest.files.values()) if latest else 0,
        "nfiles": len(latest.files) if latest else 0,
    }


def worker(out: Path) -> None:
    from colabjob.jobs.distributed import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    init_distributed()
    rank = dist.get_rank()
    scratch = out.parent
    model, opt = build(rank)
    half = DCP_RUNS // 2
    base = bench_dcp(model, opt, scratch, half, "before")
    ours = bench_ours(model, opt, scratch)
    base += bench_dcp(model, opt, scratch, DCP_RUNS - half, "after")
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())  # DTensors: the global count
        ours["dcp"] = base[:half] + ours.pop("between") + base[half:]
        out.write_text(json.dumps({"params": params, **ours}))
    dist.barrier()
    shutdown_distributed()


def report(r: dict[str, Any]) -> None:
    dcp_s = statistics.median(r["dcp"])
    plain = statistics.median(r["plain"])
    stall = statistics.median(r["stalls"]) - plain
    commit = statistics.median(r["commits"])
    n = len(r["stalls"])
    print(f"model: {r['params'] / 1e6:.1f}M parameters, AdamW, FSDP2 on 2 CPU processes (gloo)")
    print(f"checkpoint: {r['nbytes'] / 1e6:.0f} MB in {r['nfiles']} files")
    print(f"training step {statistics.median(r['train']):.3f} s; plain s.step() {plain:.4f} s")
    print(
        f"dcp.save by hand (get_state_dict + dcp.save, slowest rank): {dcp_s:.3f} s "
        f"(median of {len(r['dcp'])}: {', '.join(f'{t:.2f}' for t in r['dcp'])})"
    )
    print(f"ours: loop blocked {stall:.3f} s per checkpoint (median of {n})")
    print(
        f"ours, while training: checkpoint start to manifest committed {commit:.3f} s "
        f"(median of {n}; "
        f"background part {statistics.median(r['background']):.3f} s)"
    )
    write, upload, manifest = (statistics.median(p) for p in zip(*r["parts"], strict=True))
    print(
        f"ours: background part = DCP writes + state.json {write:.3f} s + upload/size checks "
        f"{upload:.3f} s "
        f"+ manifest {manifest:.3f} s (medians)"
    )
    final = statistics.median(r["finals"])
    print(
        f"ours: the protocol alone, synchronous s.save(final=True) with nothing else running "
        f"(slowest rank): {final:.3f} s "
        f"(median of {len(r['finals'])}: {', '.join(f'{t:.2f}' for t in r['finals'])})"
    )
    if r["final_parts"]:
        parts = zip(*r["final_parts"], strict=True)
        write, upload, manifest = (statistics.median(p) for p in parts)
        print(
            f"ours, synchronous, after the DCP write: state.json {write:.3f} s + size checks "
            f"{upload:.3f} s + manifest {manifest:.3f} s (rank 0, medians)"
        )
    result = {
        "bench": "sharded_checkpoint",
        "stall_vs_sync": round(stall / dcp_s, 3),
        "commit_vs_dcp": round(final / dcp_s, 3),
        "commit_under_training_vs_dcp": round(commit / dcp_s, 3),
        "stall_s": round(stall, 3),
        "commit_s": round(final, 3),
        "commit_under_training_s": round(commit, 3),
        "dcp_save_s": round(dcp_s, 3),
    }
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a rank: write results here
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    from colabjob.runner.launch import launch

    (REPO / ".bench").mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sharded_checkpoint-", dir=REPO / ".bench"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        out = scratch / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out)]
        got = launch(cmd, nproc=2, env=env, cwd=REPO, timeout=LAUNCH_TIMEOUT)
        if got.exit_code != 0 or not out.is_file():
            print(f"the 2 ranks failed (exit {got.exit_code}); see their output above")
            sys.exit(1)
        results = json.loads(out.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(results)


if __name__ == "__main__":
    main()
