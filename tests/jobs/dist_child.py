"""A tiny Session-API training job for one rank of a multi-process (gloo, CPU) run.

``segment(...)`` trains one segment of the job at ``store`` with a hand-built
``SegmentContext`` (no lease or record): a small MLP (dropout optional) wrapped in
``DistributedDataParallel`` when a process group is up, AdamW or SGD, a warmup
``LambdaLR``, ``make_distributed_loader`` over ``NoisyDataset``. Rank 0 alone may be told to
stop at a step (``stop_at``); the others never decide to stop on their own. It returns, per
optimizer step, the sample ids this rank consumed. The pytest process calls it directly for
single-process segments; as a script (``python -m tests.jobs.dist_child``, one per rank,
started by ``colabjob.runner.launch``) it runs ``--segment STORE:STOP_AT:INIT_SEED``
segments in order (``STOP_AT`` ``-`` for none) and writes ``OUT.<i>.rank<r>.json``.
``signal`` mode instead runs through ``colabjob.session()`` (lease, record, watchdog) and
rank 1 sends itself SIGUSR1 after its ``--signal-after``-th micro-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from colabjob.jobs.context import SegmentContext
from colabjob.jobs.data import make_loader
from colabjob.jobs.distributed import (
    World,
    init_distributed,
    make_distributed_loader,
    shutdown_distributed,
)
from colabjob.jobs.policy import NeverStop, StopPolicy, StopReason
from colabjob.jobs.session import Session
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore

from .helpers import IN, OUT, NoisyDataset, _lr_lambda, shuffled_stream

N_SAMPLES = 36
DATA_SEED = 11


class StopAt(StopPolicy):
    """Stop once the bound session reaches optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.session: Session | None = None

    def should_stop(self) -> StopReason | None:
        assert self.session is not None
        return StopReason.BUDGET if self.session.global_step >= self.at else None


def build(
    *,
    init_seed: int,
    batch_size: int,
    grad_accum: int,
    total: int,
    dropout: bool,
    opt: str,
    data: str = "map",
) -> dict[str, Any]:
    """Fresh objects; each rank seeds its RNGs apart, so per-rank RNG state matters.
    ``data="shuffled"``: a ``ShuffledStream`` over 6 shards, split across the ranks."""
    world = World.current()
    seed = init_seed + 100 * world.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.3))
    module = nn.Sequential(*layers, nn.Linear(16, OUT))
    model: nn.Module = module
    if world.distributed:
        model = nn.parallel.DistributedDataParallel(module)  # broadcasts rank 0's weights
    if opt == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if data == "shuffled":
        loader: Any = make_loader(
            shuffled_stream("shards", N_SAMPLES, buffer_size=4), batch_size=batch_size,
            seed=DATA_SEED,
        )
    else:
        loader = make_distributed_loader(
            NoisyDataset(N_SAMPLES), batch_size=batch_size, seed=DATA_SEED, grad_accum=grad_accum
        )
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup=2))
    return {"model": model, "optimizer": optimizer, "scheduler": sched, "loader": loader}


def train(s: Session, o: dict[str, Any], grad_accum: int, hook: Any = None) -> list[Any]:
    """The user's loop; returns ``[step, ids]`` per optimizer step (this rank's ids)."""
    model, opt, sched = o["model"], o["optimizer"], o["scheduler"]
    model.train()
    steps: list[Any] = []
    window: list[int] = []
    for batch in s.batches():
        logits = model(batch["x"].float())
        loss = nn.functional.cross_entropy(logits, batch["y"].long())
        (loss / grad_accum).backward()
        window += batch["index"].tolist()
        boundary = s.optimizer_step_due
        if boundary:
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        if hook is not None:
            hook()
        stop = s.step(loss=loss.item())
        if boundary:
            steps.append([s.global_step, window])
            window = []
        if stop:
            break
    return steps


def segment_context(
    store: str | Path, *, total: int, stop_at: int | None, allow_geometry_change: bool
) -> tuple[SegmentContext, Any]:
    """The hand-built context of a test segment (a checkpoint every 2 steps) and its policy:
    ``StopAt(stop_at)`` on the main rank (the others learn of the stop by agreement)."""
    policy: Any = (
        StopAt(stop_at) if stop_at is not None and World.current().is_main else NeverStop()
    )
    st = open_store(store)
    ctx = SegmentContext(
        store=st,
        checkpoints=CheckpointStore(st),
        policy=policy,
        max_steps=total,
        every_steps=2,
        log_every_steps=1,
        allow_geometry_change=allow_geometry_change,
    )
    return ctx, policy


def segment(
    store: str | Path,
    *,
    total: int,
    stop_at: int | None,
    init_seed: int,
    batch_size: int,
    grad_accum: int,
    dropout: bool = True,
    opt: str = "adamw",
    allow_geometry_change: bool = False,
    data: str = "map",
) -> dict[str, Any]:
    """One segment with a hand-built context; the rank's ids per step and its outcome."""
    world = World.current()
    ctx, policy = segment_context(
        store, total=total, stop_at=stop_at, allow_geometry_change=allow_geometry_change
    )
    o = build(
        init_seed=init_seed,
        batch_size=batch_size,
        grad_accum=grad_accum,
        total=total,
        dropout=dropout,
        opt=opt,
        data=data,
    )
    with Session(ctx) as s:
        if isinstance(policy, StopAt):
            policy.session = s
        s.track(**o, grad_accum=grad_accum)
        steps = train(s, o, grad_accum)
    return {"rank": world.rank, "steps": steps, "outcome": _outcome(s)}


def _outcome(s: Session) -> dict[str, Any]:
    out = s.outcome
    assert out is not None
    return {
        "stop_reason": out.stop_reason,
        "first_step": out.first_step,
        "last_step": out.last_step,
        "checkpoint_step": out.checkpoint_step,
        "completed": out.completed,
    }


def signal_segment(store: str, *, total: int, signal_after: int, grad_accum: int) -> dict[str, Any]:
    """Through ``colabjob.session()``; rank 1 alone gets SIGUSR1 mid-window."""
    import colabjob

    world = World.current()
    seen = [0]

    def hook() -> None:
        seen[0] += 1
        if world.rank == 1 and seen[0] == signal_after:
            os.kill(os.getpid(), signal.SIGUSR1)

    o = build(
        init_seed=0, batch_size=2, grad_accum=grad_accum, total=total, dropout=True, opt="adamw"
    )
    with colabjob.session(
        store,
        max_steps=total,
        every_steps=None,
        every_minutes=None,
        platform="local",
        log=None,
        config={"job": "dist-signal"},
    ) as s:
        s.track(**o, grad_accum=grad_accum)
        steps = train(s, o, grad_accum, hook=hook)
    return {"rank": world.rank, "steps": steps, "outcome": _outcome(s)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("segments", "signal"))
    p.add_argument("out")
    p.add_argument("--segment", action="append", default=[], help="STORE:STOP_AT:INIT_SEED")
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--opt", default="adamw")
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--allow-geometry-change", action="store_true")
    p.add_argument("--signal-after", type=int, default=0)
    p.add_argument("--data", choices=("map", "shuffled"), default="map")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    init_distributed()  # before the model is wrapped in DDP (as any DDP script does)
    if args.mode == "signal":
        results = [
            signal_segment(
                args.segment[0],
                total=args.total,
                signal_after=args.signal_after,
                grad_accum=args.grad_accum,
            )
        ]
    else:
        results = [
            segment(
                store,
                total=args.total,
                stop_at=stop_at,
                init_seed=seed,
                batch_size=args.batch_size,
                grad_accum=args.grad_accum,
                dropout=not args.no_dropout,
                opt=args.opt,
                allow_geometry_change=args.allow_geometry_change,
                data=args.data,
            )
            for store, stop_at, seed in segment_specs(args.segment)
        ]
    write_results(args.out, results)
    shutdown_distributed()
    return 0


def segment_specs(specs: list[str]) -> list[tuple[str, int | None, int]]:
    """``--segment STORE:STOP_AT:INIT_SEED`` arguments (``STOP_AT`` ``-``: no stop)."""
    out = []
    for spec in specs:
        store, stop, seed = spec.rsplit(":", 2)
        out.append((store, None if stop == "-" else int(stop), int(seed)))
    return out


def write_results(out: str, results: list[dict[str, Any]]) -> None:
    """Each segment's result of this rank as ``OUT.<segment>.rank<rank>.json``."""
    for i, result in enumerate(results):
        Path(f"{out}.{i}.rank{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
