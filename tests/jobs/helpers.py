"""Tiny CPU training fixtures shared by the jobs tests: models, datasets and a loop.

``TinyNet`` (dropout, so the torch RNG matters), ``NoisyDataset`` (map-style, per-sample
noise from ``sample_rng`` so it is exact with worker processes; counts ``__getitem__``),
``hf_iterable`` (an HF ``datasets.IterableDataset`` built in memory), ``shuffled_stream`` (a
``ShuffledStream`` over it or over sharded rows), ``tiny_gpt2`` (from a
config, nothing downloaded), and ``Trainer``: AdamW, a warmup+decay ``LambdaLR``, a CPU
``GradScaler`` and gradient accumulation, whose loss also draws from Python's ``random`` and
NumPy's global RNG so a missing RNG restore changes the numbers.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from colabjob.jobs.data import Geometry, sample_rng
from colabjob.jobs.state.capture import snapshot, write_snapshot
from colabjob.jobs.state.format import Counters
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.tracked import Tracked

GRAD_ACCUM = 4
IN, OUT = 8, 3


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class NoisyDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """``n`` fixed points plus per-(epoch, index) noise; records every ``__getitem__``."""

    def __init__(self, n: int, *, seed: int = 7) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN, generator=g)
        self.y = torch.randint(0, OUT, (n,), generator=g)
        self.seed, self.epoch, self.calls = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.calls += 1
        noise = torch.randn(IN, generator=sample_rng(self.seed, self.epoch, index))
        return {"x": self.x[index] + 0.1 * noise, "y": self.y[index], "index": index}


class CountingDataset(torch.utils.data.Dataset[int]):
    """A huge dataset that only counts reads."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        self.calls += 1
        return index


def hf_iterable(n: int, *, num_shards: int = 3, seed: int = 7) -> Any:
    """An HF ``datasets.IterableDataset`` with the same rows as ``NoisyDataset`` (no noise)."""
    import datasets

    base = NoisyDataset(n, seed=seed)
    table = {"x": base.x.tolist(), "y": base.y.tolist(), "index": list(range(n))}
    ds = datasets.Dataset.from_dict(table).to_iterable_dataset(num_shards=num_shards)
    return ds.with_format("torch")


def _rows(base: NoisyDataset, shard: range, row: int) -> Any:
    return (base[i] for i in shard[row:])


def shuffled_stream(source: str, n: int, *, buffer_size: int = 8, seed: int = 5) -> Any:
    """A ``ShuffledStream`` over ``hf_iterable(n)`` (``source="hf"``) or over
    ``NoisyDataset(n)``'s rows cut into 6 shards (``source="shards"``, a ``ShardedStream``)."""
    from colabjob.jobs.data import ShardedStream, ShuffledStream

    if source == "hf":
        inner: Any = hf_iterable(n)
    else:
        base = NoisyDataset(n)
        shards = [range(i, n, 6) for i in range(6)]
        inner = ShardedStream(shards, functools.partial(_rows, base), seed=seed)
    return ShuffledStream(inner, buffer_size=buffer_size, seed=seed)


def tiny_gpt2(seed: int = 0) -> Any:
    """A one-layer GPT-2 from a config (tied input/output embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=50)
    return GPT2LMHeadModel(cfg)


def _lr_lambda(total: int, warmup: int = 3) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


@dataclass
class Trainer:
    """One session's live objects. ``build`` makes them fresh from ``init_seed``."""

    model: TinyNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: Any
    geometry: Geometry
    counters: Counters = field(default_factory=Counters)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    window: list[tuple[float, list[int]]] = field(default_factory=list)  # this step's micro-batches

    @classmethod
    def build(cls, loader: Any, *, init_seed: int, total_steps: int) -> Trainer:
        torch.manual_seed(init_seed)
        random.seed(init_seed)
        np.random.seed(init_seed)
        model = TinyNet()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total_steps))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
        geometry = Geometry(batch_size=loader.batch_size, grad_accum=GRAD_ACCUM)
        return cls(model, opt, sched, scaler, loader, geometry)

    def tracked(self) -> Tracked:
        return Tracked(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            loader=self.loader,
            geometry=self.geometry,
        )

    def restore(self, directory: Path) -> None:
        got = restore(directory, self.tracked())
        self.counters, self.metrics = got.counters, got.metrics

    def save(self, directory: Path) -> dict[str, Path]:
        snap = snapshot(self.tracked(), counters=self.counters, metrics=self.metrics)
        return write_snapshot(snap, directory)

    def train_until(self, step: int) -> None:
        """Train to optimizer step ``step``; returns right after that step."""
        self.model.train()
        empty_epochs = 0
        while self.counters.step < step:
            before = self.counters.samples_seen
            for batch in self.loader:
                self._micro_batch(batch)
                if self.counters.at_optimizer_boundary and self.counters.step >= step:
                    return
            self.counters = self.counters.with_epoch(self.counters.epoch + 1)
            empty_epochs = empty_epochs + 1 if self.counters.samples_seen == before else 0
            assert empty_epochs < 2, "the loader keeps yielding empty epochs"

    def _micro_batch(self, batch: dict[str, Any]) -> None:
        logits = self.model(batch["x"].float())
        loss = nn.functional.cross_entropy(logits, batch["y"].long())
        loss = loss * (1 + 0.01 * random.random()) * (1 + 0.01 * float(np.random.rand()))
        self.scaler.scale(loss / GRAD_ACCUM).backward()
        n = len(batch["y"])
        self.counters = self.counters.after_micro_batch(samples=n, grad_accum=GRAD_ACCUM)
        self.window.append((loss.item(), batch["index"].tolist()))
        if not self.counters.at_optimizer_boundary:
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        losses, indices = zip(*self.window, strict=True)
        self.metrics.append(
            {
                "step": self.counters.step,
                "losses": list(losses),
                "indices": list(indices),
                "epoch": self.counters.epoch,
                "lr": self.scheduler.get_last_lr()[0],
            }
        )
        self.window = []


def run_straight(make_loader: Callable[[], Any], *, total: int, init_seed: int = 0) -> Trainer:
    tr = Trainer.build(make_loader(), init_seed=init_seed, total_steps=total)
    tr.train_until(total)
    return tr


def run_split(
    make_loader: Callable[[], Any], *, total: int, splits: list[int], workdir: Path
) -> Trainer:
    """Train in sessions ending at ``splits``. The first starts like ``run_straight``; each
    later one builds every object anew from another seed and restores the previous files."""
    previous: Path | None = None
    tr: Trainer | None = None
    for i, stop in enumerate([*splits, total]):
        tr = Trainer.build(make_loader(), init_seed=1000 * i, total_steps=total)
        if previous is not None:
            tr.restore(previous)
        tr.train_until(stop)
        if stop != total:
            previous = workdir / f"session-{i}"
            tr.save(previous)
    assert tr is not None
    return tr


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k}: max |dw| = {(sa[k] - sb[k]).abs().max()}"


def train_tiny(
    s: Any,
    *,
    clock: Any = None,
    step_seconds: float = 60.0,
    model: nn.Module | None = None,
    opt: torch.optim.Optimizer | None = None,
    after: Callable[[Any], None] | None = None,
) -> None:
    """A Session loop over ``TinyNet`` (or ``model``, with AdamW or ``opt``) and 24
    ``NoisyDataset`` samples (batch 4): with a fake ``clock`` each step "takes"
    ``step_seconds``; ``after(s)`` runs before each ``s.step()``."""
    from colabjob.jobs.data import make_loader

    torch.manual_seed(0)
    model = TinyNet() if model is None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if opt is None else opt
    s.track(model=model, optimizer=opt, loader=make_loader(NoisyDataset(24), batch_size=4, seed=1))
    for batch in s.batches():
        loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if clock is not None:
            clock.advance(step_seconds)
        if after is not None:
            after(s)
        if s.step(loss=loss.item()):
            break
