"""GPT-2 124M (random init from its config) trains on the GPU with a checkpoint due every 2
steps through the Session API; the checkpoints commit while the loop goes on (each step
also "takes" ``STEP_SLEEP`` more, as a real step would), and a fresh model and optimizer
restored from the last one equal the trained ones.

The loop's stall per checkpoint (how long ``s.step()`` blocks when it starts a background
one, after the step's own GPU work is synchronized) is printed against a synchronous
``torch.save`` + fsync of the same model and optimizer state. Printed, never asserted:
tests don't time things; ``benchmarks/checkpoint_stall.py`` reports the CPU figure.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from colabjob.jobs.context import SegmentContext
from colabjob.jobs.data import make_loader
from colabjob.jobs.policy import StopPolicy
from colabjob.jobs.session import Session
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore

EVERY, TOTAL = 2, 12  # background checkpoints due every 2 steps; the final one (sync) at 12
BATCH, SEQ = 4, 256
STEP_SLEEP = 0.3  # seconds: a 124M step on a big GPU is far shorter than a 1.5 GB write


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index]}


def _gpt2_124m(seed: int) -> tuple[Any, torch.optim.Optimizer]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config()).to("cuda")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _loader() -> Any:
    return make_loader(Tokens(64, vocab=50257), batch_size=BATCH, seed=3)


class Commits(StopPolicy):
    """A ``StopPolicy`` that never stops and records every committed checkpoint's size."""

    def __init__(self) -> None:
        self.nbytes: list[int] = []

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        self.nbytes.append(nbytes)


def _ctx(root: Path, staging: Path, policy: Commits) -> SegmentContext:
    store = open_store(root)
    return SegmentContext(
        store=store,
        checkpoints=CheckpointStore(store, staging_dir=staging),
        policy=policy,
        every_steps=EVERY,
        max_steps=TOTAL,
        log_every_steps=1,
        staging_dir=staging,
    )


def _sync_save_seconds(model: Any, opt: torch.optim.Optimizer, path: Path) -> float:
    """What a user writes by hand: torch.save of both state dicts from the GPU, fsync."""
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
        path.unlink()
    return min(times)


def test_gpt2_124m_checkpoints_commit_while_training_and_load(
    tmp_path: Path, cuda_memory: None
) -> None:
    model, opt = _gpt2_124m(seed=0)
    params = sum(p.numel() for p in model.parameters())
    assert 120e6 < params < 130e6, params
    commits = Commits()
    ctx = _ctx(tmp_path / "job", tmp_path / "stage", commits)
    stalls: list[float] = []  # s.step() calls that started a background checkpoint
    overlapped = 0  # training steps run while a checkpoint was still being written
    with Session(ctx) as s:
        s.track(model=model, optimizer=opt, loader=_loader())
        for batch in s.batches():
            ids = batch["input_ids"].to("cuda")
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = loss.item()  # synchronizes: the step's GPU work is done
            time.sleep(STEP_SLEEP)
            before = bool(s.status()["uploading"])
            t0 = time.perf_counter()
            stop = s.step(loss=value)
            blocked = time.perf_counter() - t0
            if stop:
                break
            overlapped += before
            if not before and s.status()["uploading"]:
                stalls.append(blocked)
    out = s.outcome
    assert out is not None and out.completed and out.checkpoint_step == TOTAL
    info = ctx.checkpoints.latest()
    assert info is not None and info.step == TOTAL
    assert len(commits.nbytes) >= 2  # at least one background checkpoint and the final one
    assert min(commits.nbytes) > 4 * params  # the weights are in each (and AdamW's moments)

    sync = _sync_save_seconds(model, opt, tmp_path / "sync.pt")
    mb = sum(int(f["size"]) for f in info.files.values()) / 1e6
    stall = (
        f"loop blocked {statistics.median(stalls):.3f} s per background checkpoint (median "
        f"of {len(stalls)}) vs sync torch.save {sync:.3f} s: stall ratio "
        f"{statistics.median(stalls) / sync:.2f}"
        if stalls
        else f"no background checkpoint started (sync torch.save {sync:.3f} s)"
    )
    print(
        f"\nGPT-2 124M on {torch.cuda.get_device_name(0)}: checkpoint {mb:.0f} MB, "
        f"{len(commits.nbytes)} committed; {stall}; {overlapped} steps ran during a write"
    )

    # a fresh model and optimizer (another seed) come back equal to the trained ones
    fresh, fresh_opt = _gpt2_124m(seed=1)
    with Session(_ctx(tmp_path / "job", tmp_path / "stage", Commits())) as s2:
        got = s2.track(
            model=fresh,
            optimizer=fresh_opt,
            loader=_loader(),
        )
        assert got is not None and got.step == TOTAL and s2.global_step == TOTAL
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert a.device == b.device and torch.equal(a, b), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
