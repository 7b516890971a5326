"""How long a checkpoint blocks the training loop: colabjob's Session vs saving by hand.

A ~50M-parameter model (12 square 2048-wide Linear layers, built locally as a
``PreTrainedModel`` so HF Trainer can save it too) trains with AdamW; a checkpoint is then
~600 MB (weights + two AdamW moments). Three ways to checkpoint the same state, against a
fake-gcs-server emulator on loopback:

- ``ours``: ``colabjob.session("gs://...")`` checkpointing every 2 steps. The figure is the
  time ``s.step()`` takes when it starts a checkpoint: the state is copied to CPU memory;
  writing, hashing and uploading run on a background thread (one in flight, so checkpoints
  that fall due meanwhile wait). Also reported: how much slower the training steps that
  overlap a background upload are than steps timed without any checkpointing (CPU and GIL
  contention on this 2-core machine), and the loop time lost per checkpoint in total.
- ``sync``: what a user writes by hand: ``torch.save`` of model + optimizer state dicts to
  local disk, ``fsync``, then a gcsfs ``put`` of the file to the bucket. The loop waits for
  all of it.
- ``hf``: HF Trainer's ``_save_checkpoint`` (model safetensors, optimizer, scheduler, RNG,
  trainer state) to local disk only, for reference: no upload, no fsync.

Each figure is a median; ratios are against ``sync`` (target: stall <= 0.25x). Reports only.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import colabjob  # noqa: E402
from tests.gcs_emulator import running_emulator  # noqa: E402

BUCKET = "bench"
WIDTH, LAYERS, BATCH = 2048, 12, 4
OUR_CHECKPOINTS = 3  # background checkpoints measured (plus a final one, not counted)
BASE_STEPS = 6  # training steps timed without any checkpointing, for the slowdown figure
SYNC_RUNS = 3
HF_RUNS = 3


class StackConfig(PretrainedConfig):
    model_type = "colabjob-bench-stack"

    def __init__(self, width: int = WIDTH, layers: int = LAYERS, **kw: Any) -> None:
        self.width, self.layers = width, layers
        super().__init__(**kw)


class StackModel(PreTrainedModel):
    config_class = StackConfig

    def __init__(self, config: StackConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(
            nn.Linear(config.width, config.width) for _ in range(config.layers)
        )
        self.post_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(step))
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def build() -> tuple[StackModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = StackModel(StackConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, opt, 0)  # AdamW allocates its moments on the first step
    return model, opt


def base_steps(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    times = []
    for i in range(BASE_STEPS):
        t0 = time.perf_counter()
        train_step(model, opt, 10_000 + i)
        times.append(time.perf_counter() - t0)
    return times


def bench_ours(model: nn.Module, opt: torch.optim.Optimizer, scratch: Path) -> dict[str, float]:
    url = f"gs://{BUCKET}/{uuid.uuid4().hex}/ours"
    stalls: list[float] = []
    idle_steps = base_steps(model, opt)  # no checkpoint anywhere: the baseline step time
    busy_steps: list[float] = []
    with colabjob.session(
        url, every_steps=2, log=None, platform="local", staging_dir=scratch / "stage"
    ) as s:
        s.track(model=model, optimizer=opt, batch_size=BATCH)
        ckpts = s.ctx.checkpoints
        step = 0
        while len(stalls) < OUR_CHECKPOINTS:
            step += 1
            uploading = ckpts.pending is not None and not ckpts.pending.done()
            t0 = time.perf_counter()
            loss = train_step(model, opt, step)
            t1 = time.perf_counter()
            before = ckpts.pending
            s.step(loss=loss)
            t2 = time.perf_counter()
            if uploading:
                busy_steps.append(t1 - t0)
            if ckpts.pending is not before:  # this step() started a checkpoint
                stalls.append(t2 - t1)
    idle_steps += base_steps(model, opt)  # after the final commit, too
    final = ckpts.latest()
    size = sum(int(f["size"]) for f in final.files.values()) if final else 0
    idle = statistics.median(idle_steps)
    slowed = sum(busy_steps) - idle * len(busy_steps)  # training slowed by the background work
    return {
        "lost_s": (sum(stalls) + slowed) / len(stalls),
        "stall_s": statistics.median(stalls),
        "step_idle_s": idle,
        "step_uploading_s": statistics.median(busy_steps) if busy_steps else float("nan"),
        "nbytes": float(size),
    }


def bench_sync(model: nn.Module, opt: torch.optim.Optimizer, scratch: Path) -> float:
    from gcsfs import GCSFileSystem

    fs = GCSFileSystem(token="anon", endpoint_url=os.environ["STORAGE_EMULATOR_HOST"])
    base = f"{BUCKET}/{uuid.uuid4().hex}/sync"
    times = []
    for i in range(SYNC_RUNS):
        path = scratch / f"sync-{i}.pt"
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": i}, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        fs.put(str(path), f"{base}/ckpt-{i}.pt")
        times.append(time.perf_counter() - t0)
        path.unlink()
        fs.rm(f"{base}/ckpt-{i}.pt")  # keep the in-memory emulator small
    return statistics.median(times)


def bench_hf(model: StackModel, opt: torch.optim.Optimizer, scratch: Path) -> float:
    from transformers import Trainer, TrainingArguments

    out = scratch / "hf"
    args = TrainingArguments(
        output_dir=str(out), report_to="none", use_cpu=True, save_total_limit=None
    )
    trainer = Trainer(model=model, args=args)
    trainer.optimizer = opt
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    times = []
    for i in range(HF_RUNS):
        trainer.state.global_step = i + 1
        t0 = time.perf_counter()
        trainer._save_checkpoint(trainer.model, trial=None)
        times.append(time.perf_counter() - t0)
        shutil.rmtree(out / f"checkpoint-{i + 1}")
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)  # one core trains, the other is left to background I/O
    hf_logging.disable_progress_bar()
    (REPO / ".bench").mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="checkpoint_stall-", dir=REPO / ".bench"))
    try:
        model, opt = build()
        params = sum(p.numel() for p in model.parameters())
        print(f"model: {params / 1e6:.1f}M parameters, AdamW; batch {BATCH}")
        with running_emulator(BUCKET):
            ours = bench_ours(model, opt, scratch)
            sync = bench_sync(model, opt, scratch)
        hf = bench_hf(model, opt, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mb = ours["nbytes"] / 1e6
    print(f"checkpoint size: {mb:.0f} MB")
    print(
        f"ours: loop blocked {ours['stall_s']:.3f} s per checkpoint (median of {OUR_CHECKPOINTS})"
    )
    print(
        f"ours: training step {ours['step_idle_s']:.3f} s idle, {ours['step_uploading_s']:.3f} s "
        "while a checkpoint uploads in the background"
    )
    print(f"ours: loop time lost per checkpoint, stall + slower steps: {ours['lost_s']:.3f} s")
    print(f"sync by hand (torch.save + fsync + gcsfs put): {sync:.3f} s (median of {SYNC_RUNS})")
    print(f"HF Trainer _save_checkpoint to local disk: {hf:.3f} s (median of {HF_RUNS})")
    result = {
        "bench": "checkpoint_stall",
        "stall_vs_sync_upload": round(ours["stall_s"] / sync, 3),
        "hf_save_vs_sync_upload": round(hf / sync, 3),
        "stall_s": round(ours["stall_s"], 3),
        "sync_upload_s": round(sync, 3),
        "step_slowdown_while_uploading": round(ours["step_uploading_s"] / ours["step_idle_s"], 3),
        "loop_time_lost_vs_sync_upload": round(ours["lost_s"] / sync, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
