"""A small job on one CUDA device through the Session API, in-process or as a child process.

``build(precision, init_seed=..., total=...)`` makes one session's live objects on ``cuda``:
the dropout MLP of ``tests.jobs.helpers`` (so the CUDA RNG matters), AdamW, a warmup-then-decay
``LambdaLR``, a ``GradScaler("cuda")`` (enabled for fp16 only) and a resumable loader over
``NoisyDataset``, packed in ``equiv_child.Objects``. ``train(s, objects, precision)`` is the
README loop under ``torch.autocast`` (accumulation 2; the loss also draws from Python's and
NumPy's global RNGs) and returns the dtype of every micro-batch's logits. The loss is a
cross-entropy written out by hand: ``nll_loss`` has no deterministic CUDA kernel.

As a script, ``python -m tests.gpu.gpu_child STORE --total N --out FILE`` runs one segment
through ``colabjob.session`` with ``torch.use_deterministic_algorithms(True)`` and, once the
job is complete, saves the final weights, optimizer, scaler and metrics history to FILE
(``torch.save``; read it with ``load_final``). ``--kill`` is ``equiv_child``'s: SIGKILL after
the N-th micro-batch (``step:N``), inside the N-th file upload (``put:N``), just before or
right after the N-th manifest (``manifest:N``, ``committed:N``); ``--slow S`` sleeps S seconds
per micro-batch, so that a background commit usually ends before the next one falls due
(one is in flight at a time; one due meanwhile is skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colabjob.jobs.data import make_loader
from colabjob.jobs.session import Session
from tests.jobs.equiv_child import N_SAMPLES, Objects, _install_kill
from tests.jobs.helpers import OUT, NoisyDataset, TinyNet, _lr_lambda

DEVICE = "cuda"
GRAD_ACCUM = 2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build(precision: str, *, init_seed: int, total: int) -> Objects:
    """Fresh objects on the GPU; a resumed session passes another ``init_seed`` (which
    reseeds every CUDA device too), so only a complete restore continues the straight run."""
    torch.manual_seed(init_seed)
    random.seed(init_seed)
    np.random.seed(init_seed)
    loader = make_loader(NoisyDataset(N_SAMPLES), batch_size=4, seed=11)
    model = TinyNet().to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup=4))
    scaler = torch.amp.GradScaler(
        DEVICE, init_scale=2.0**10, growth_interval=3, enabled=precision == "fp16"
    )
    return Objects(model, opt, sched, scaler, loader, GRAD_ACCUM)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from log-softmax and a one-hot mask (deterministic on CUDA)."""
    one_hot = (torch.arange(OUT, device=logits.device) == target[:, None]).to(logits.dtype)
    return -(one_hot * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def train(
    s: Session,
    o: Objects,
    precision: str,
    *,
    on_micro_batch: Any = None,
    on_step: Any = None,
) -> list[torch.dtype]:
    """The user's loop; ``on_step()`` runs after each optimizer step, ``on_micro_batch()``
    after each micro-batch (before ``s.step``)."""
    dtype = DTYPES.get(precision)
    seen: list[torch.dtype] = []
    o.model.train()
    for batch in s.batches():
        x, y = batch["x"].float().to(DEVICE), batch["y"].long().to(DEVICE)
        autocast = (
            torch.autocast(DEVICE, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            logits = o.model(x)
        seen.append(logits.dtype)
        loss = cross_entropy(logits.float(), y)
        loss = loss * (1 + 0.01 * random.random()) * (1 + 0.01 * float(np.random.rand()))
        o.scaler.scale(loss / o.grad_accum).backward()
        if s.optimizer_step_due:
            o.scaler.step(o.optimizer)
            o.scaler.update()
            o.optimizer.zero_grad(set_to_none=True)
            o.scheduler.step()
            if on_step is not None:
                on_step()
        if on_micro_batch is not None:
            on_micro_batch()
        if s.step(loss=loss.item()):
            break
    return seen


def final_state(o: Objects, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": o.model.state_dict(),
        "optimizer": o.optimizer.state_dict(),
        "scaler": o.scaler.state_dict(),
        "metrics": metrics,
    }


def load_final(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal structure and bit-identical tensors (dtype and device too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.device == b.device, f"{where}: {a.dtype} vs {b.dtype}"
        assert torch.equal(a, b), f"{where}: max |d| = {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} vs {b}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--kill", default="none")
    p.add_argument("--out", type=Path, required=True, help="final state, once the job completes")
    p.add_argument("--lease-ttl", type=float, default=0.5)
    p.add_argument("--slow", type=float, default=0.0, help="seconds to sleep per micro-batch")
    args = p.parse_args(argv)
    torch.use_deterministic_algorithms(True)  # needs CUBLAS_WORKSPACE_CONFIG (the parent's)
    torch.backends.cudnn.benchmark = False
    import colabjob

    kill = _install_kill(args.kill)

    def hook() -> None:
        time.sleep(args.slow)  # a periodic commit (milliseconds here) ends before the next
        if kill is not None:
            kill()

    objs = build(args.precision, init_seed=args.init_seed, total=args.total)
    with colabjob.session(
        args.store,
        max_steps=args.total,
        every_steps=args.every,
        log_every_steps=1,
        log=None,
        force=True,
        lease_ttl=args.lease_ttl,
        platform="local",
        staging_dir=f"{args.store}-staging",
    ) as s:
        objs.track(s)
        print(f"ready {s.global_step}", flush=True)
        train(s, objs, args.precision, on_micro_batch=hook)
    outcome = s.outcome
    assert outcome is not None
    if outcome.completed:
        torch.save(final_state(objs, s.metrics), args.out)
    print(f"done {outcome.stop_reason} {outcome.last_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
