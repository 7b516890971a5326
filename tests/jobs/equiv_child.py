"""A tiny training job written against the Session API, run in-process or as a child.

``build(config, init_seed, total)`` makes the live objects of one session (a dropout MLP,
AdamW, a warmup-then-decay ``LambdaLR``, a CPU ``GradScaler`` and a resumable loader over a
map-style or an HF iterable dataset); ``train(session, objects)`` is the plain loop of the
README, whose loss also draws from Python's and NumPy's global RNGs. As a script
(``python -m tests.jobs.equiv_child STORE --config C --total N``) it runs one segment
through ``colabjob.session``; the job's result is its final committed checkpoint.
``--kill`` makes it SIGKILL itself at a chosen point: ``step:N`` (after its N-th
micro-batch), ``put:N`` (inside the N-th checkpoint file upload, on the background upload
thread for periodic checkpoints), ``manifest:N`` (just before the N-th manifest is
created), ``committed:N`` (right after it, before retention and the record update).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from colabjob.jobs.data import make_loader
from colabjob.jobs.session import Session

from .helpers import NoisyDataset, TinyNet, _lr_lambda, hf_iterable, shuffled_stream

N_SAMPLES = 42  # 11 batches of 4 per epoch (the last one of 2): windows straddle epochs


@dataclass(frozen=True)
class Config:
    dataset: str  # "map", "hf" (an HF datasets.IterableDataset) or "hf"/"shards" + "-shuffled"
    num_workers: int
    grad_accum: int
    batch_size: int = 4


CONFIGS: dict[str, Config] = {
    "map": Config(dataset="map", num_workers=0, grad_accum=4),
    "workers": Config(dataset="map", num_workers=2, grad_accum=4),
    "iterable": Config(dataset="hf", num_workers=0, grad_accum=4),
    # ShuffledStream (buffer 8) over an HF stream in-process, over 6 shards with 2 workers
    "shuffled": Config(dataset="hf-shuffled", num_workers=0, grad_accum=4),
    "shuffled-workers": Config(dataset="shards-shuffled", num_workers=2, grad_accum=4),
    "plain": Config(dataset="map", num_workers=0, grad_accum=1, batch_size=8),
}


@dataclass
class Objects:
    model: TinyNet
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loader: Any
    grad_accum: int

    def track(self, s: Session) -> Any:
        return s.track(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            loader=self.loader,
            grad_accum=self.grad_accum,
        )


def build(config: str, *, init_seed: int, total: int) -> Objects:
    """Fresh objects; a resumed session passes another ``init_seed`` so only a complete
    restore can make it continue like the straight run."""
    cfg = CONFIGS[config]
    torch.manual_seed(init_seed)
    random.seed(init_seed)
    np.random.seed(init_seed)
    if cfg.dataset == "hf":
        data: Any = hf_iterable(N_SAMPLES)
    elif cfg.dataset.endswith("-shuffled"):
        data = shuffled_stream(cfg.dataset.removesuffix("-shuffled"), N_SAMPLES)
    else:
        data = NoisyDataset(N_SAMPLES)
    loader = make_loader(data, batch_size=cfg.batch_size, seed=11, num_workers=cfg.num_workers)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup=4))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    return Objects(model, opt, sched, scaler, loader, cfg.grad_accum)


def train(s: Session, o: Objects, *, on_micro_batch: Any = None) -> None:
    """The loop a user writes (dropout, accumulation, AMP scaler, scheduler)."""
    o.model.train()
    for batch in s.batches():
        logits = o.model(batch["x"].float())
        loss = nn.functional.cross_entropy(logits, batch["y"].long())
        loss = loss * (1 + 0.01 * random.random()) * (1 + 0.01 * float(np.random.rand()))
        o.scaler.scale(loss / o.grad_accum).backward()
        if s.optimizer_step_due:
            o.scaler.step(o.optimizer)
            o.scaler.update()
            o.optimizer.zero_grad(set_to_none=True)
            o.scheduler.step()
        if on_micro_batch is not None:
            on_micro_batch()
        if s.step(loss=loss.item()):
            break


# ---- the child process ------------------------------------------------------------------


def _die(what: str) -> None:
    print(f"killing myself at {what}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(spec: str) -> Any:
    """Arm ``--kill``; returns the per-micro-batch hook (for ``step:N``) or None."""
    if spec == "none":
        return None
    what, _, n_text = spec.partition(":")
    n, seen = int(n_text), [0]

    def hit() -> bool:
        seen[0] += 1
        return seen[0] == n

    if what == "step":
        return lambda: hit() and _die(spec)
    from colabjob.storage.store import Store

    if what == "put":
        put = Store.put_file

        def put_file(self: Store, local_path: Any, key: str) -> None:
            if hit():
                _die(f"{spec} ({key})")
            put(self, local_path, key)

        Store.put_file = put_file  # type: ignore[method-assign]
    elif what in ("manifest", "committed"):
        create = Store.create

        def create_(self: Store, key: str, data: bytes) -> Any:
            is_manifest = key.endswith("manifest.json")
            if is_manifest and what == "manifest" and hit():
                _die(f"{spec} ({key})")
            version = create(self, key, data)
            if is_manifest and what == "committed" and hit():
                _die(f"{spec} ({key})")
            return version

        Store.create = create_  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown --kill {spec!r}")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--config", default="map")
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--kill", default="none")
    p.add_argument("--lease-ttl", type=float, default=0.5)
    p.add_argument("--slow", type=float, default=0.0, help="seconds to sleep per micro-batch")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import time

    import colabjob

    hook = _install_kill(args.kill)
    if args.slow:
        inner = hook

        def hook() -> None:
            time.sleep(args.slow)  # stretch the run so a signal lands mid-training
            if inner is not None:
                inner()

    objs = build(args.config, init_seed=args.init_seed, total=args.total)
    with colabjob.session(
        args.store,
        max_steps=args.total,
        every_steps=args.every,
        log_every_steps=1,
        log=None,
        force=True,
        lease_ttl=args.lease_ttl,
        platform="local",
        staging_dir=f"{args.store}-staging",  # killed saves leave their staging here, not /tmp
    ) as s:
        objs.track(s)
        print(f"ready {s.global_step}", flush=True)
        train(s, objs, on_micro_batch=hook)
    outcome = s.outcome
    assert outcome is not None
    print(f"done {outcome.stop_reason} {outcome.last_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
