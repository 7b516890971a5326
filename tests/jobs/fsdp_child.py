"""One rank of a Session-API job whose model is FSDP2-sharded (``fully_shard``, gloo, CPU).

The job is ``dist_child``'s (same MLP layout, so its state-dict keys load into the plain
model of a single-process segment; AdamW, warmup, ``make_distributed_loader``), but the
model is built from ``init_seed`` alone (FSDP2 does not broadcast weights) and sharded
with ``fully_shard``; each rank then seeds its RNGs apart (dropout differs per rank).
``--kill-at K``: right after step K every rank commits a checkpoint (``save(final=True)``)
and rank 0 SIGKILLs itself, so the launch fails with a committed sharded checkpoint at K. Run as
``python -m tests.jobs.fsdp_child OUT --segment STORE:STOP_AT:INIT_SEED ...`` through
``colabjob.runner.launch``; writes ``OUT.<i>.rank<r>.json`` like ``dist_child``.
``--dump-start PATH``: right after ``track()`` (the resume) rank 0 saves the model and
optimizer state gathered whole (``torch.save``, keys by parameter name) to ``PATH``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from colabjob.jobs.distributed import (
    World,
    init_distributed,
    make_distributed_loader,
    shutdown_distributed,
)
from colabjob.jobs.session import Session

from .dist_child import (
    DATA_SEED,
    N_SAMPLES,
    StopAt,
    _outcome,
    segment_context,
    segment_specs,
    write_results,
)
from .helpers import IN, OUT, NoisyDataset, _lr_lambda


def build(*, init_seed: int, batch_size: int, grad_accum: int, total: int) -> dict[str, Any]:
    world = World.current()
    torch.manual_seed(init_seed)  # the same weights on every rank
    module = nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, OUT))
    fully_shard(module)
    seed = init_seed + 100 * world.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-2)
    loader = make_distributed_loader(
        NoisyDataset(N_SAMPLES), batch_size=batch_size, seed=DATA_SEED, grad_accum=grad_accum
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup=2))
    return {"model": module, "optimizer": optimizer, "scheduler": sched, "loader": loader}


def segment(
    store: str,
    *,
    total: int,
    stop_at: int | None,
    init_seed: int,
    batch_size: int,
    grad_accum: int,
    kill_at: int | None,
    allow_geometry_change: bool,
    dump_start: str | None = None,
) -> dict[str, Any]:
    world = World.current()
    ctx, policy = segment_context(
        store, total=total, stop_at=stop_at, allow_geometry_change=allow_geometry_change
    )
    o = build(init_seed=init_seed, batch_size=batch_size, grad_accum=grad_accum, total=total)
    with Session(ctx) as s:
        if isinstance(policy, StopAt):
            policy.session = s
        s.track(**o, grad_accum=grad_accum)
        if dump_start is not None:
            _dump_whole(o["model"], o["optimizer"], dump_start)
        steps = _train(s, o, grad_accum, kill_at)
    return {"rank": world.rank, "steps": steps, "outcome": _outcome(s)}


def _dump_whole(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Every rank: the state gathered whole; rank 0 writes it to ``path``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=options)
    if World.current().is_main:
        torch.save({"model": msd, "optimizer": osd}, path)


def _train(s: Session, o: dict[str, Any], grad_accum: int, kill_at: int | None) -> list[Any]:
    """``dist_child.train``'s loop; right after step ``kill_at`` every rank commits a
    checkpoint (``save(final=True)``) and rank 0 is SIGKILLed (the others then hang in the
    next collective until the launcher ends them)."""
    model, opt, sched = o["model"], o["optimizer"], o["scheduler"]
    model.train()
    steps: list[Any] = []
    window: list[int] = []
    for batch in s.batches():
        loss = nn.functional.cross_entropy(model(batch["x"].float()), batch["y"].long())
        (loss / grad_accum).backward()
        window += batch["index"].tolist()
        boundary = s.optimizer_step_due
        if boundary:
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        stop = s.step(loss=loss.item())
        if boundary:
            steps.append([s.global_step, window])
            window = []
            if s.global_step == kill_at and not stop:
                s.save(final=True)
                if World.current().is_main:
                    os.kill(os.getpid(), signal.SIGKILL)
        if stop:
            break
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--segment", action="append", default=[], help="STORE:STOP_AT:INIT_SEED")
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--allow-geometry-change", action="store_true")
    p.add_argument("--dump-start", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    init_distributed()
    results = [
        segment(
            store,
            total=args.total,
            stop_at=stop_at,
            init_seed=seed,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            kill_at=args.kill_at,
            allow_geometry_change=args.allow_geometry_change,
            dump_start=args.dump_start,
        )
        for store, stop_at, seed in segment_specs(args.segment)
    ]
    write_results(args.out, results)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
