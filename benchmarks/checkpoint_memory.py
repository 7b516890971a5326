"""Peak extra host RAM of a checkpoint, as a fraction of the training state's size.

A 100.7 M-parameter model (24 square 2048-wide Linear layers) with AdamW after one step:
weights + two moments, ~1.2 GB of state. Each case runs in a fresh process; a thread samples
RSS (``/proc/self/statm``) and the kernel's peak (``VmHWM``, reset through
``/proc/self/clear_refs``) is read too. "Extra" is the peak RSS while the case runs minus the
RSS right before it, divided by the state's bytes.

- ``async``: ``colabjob.session`` (local store) checkpointing every 2 steps in the background
  (``async_checkpoint=True``). Two checkpoints (steps 2 and 4), each measured from the
  ``s.step()`` that starts it until it is committed, against the RSS before the first one
  (so memory kept alive between checkpoints counts: a copy left over from the first is what
  doubled the peak of the second). The training steps between are not measured: their
  gradients come and go whatever the checkpointing does.
- ``sync``: the same with ``async_checkpoint=False`` (what ``auto`` does when memory is short):
  written tensor by tensor from the live state.
- ``resume``: a fresh process builds the model and AdamW and loads the newest checkpoint of
  the ``sync`` job (fetched to local disk first, as ``s.track`` does, then measured: the
  load into the live tensors); the optimizer state it creates is new memory, counted as
  extra.
- anchors, same state, same machine: ``torch.save`` of model + optimizer state dicts into a
  file, and ``torch.distributed.checkpoint.async_save`` until its future completes.

Targets (issue 10): async <= 1.05, sync <= 0.15, resume <= 1.1. Reports only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WIDTH, LAYERS, BATCH = 2048, 24, 4
PAGE = os.sysconf("SC_PAGE_SIZE")
CASES = ("torch_save", "dcp_async", "async", "sync", "resume")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def peak_extra(out: list[int], base: int | None = None) -> Iterator[None]:
    """Append (peak RSS during the block) - ``base`` (default: the RSS right before it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        hwm_ok = True
    except OSError:
        hwm_ok = False
    base = _rss() if base is None else base
    peak = [_rss()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            stop.wait(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        top = max(peak[0], _rss(), (_hwm() or 0) if hwm_ok else 0)
        out.append(top - base)


def _model() -> tuple[Any, Any]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def _train_step(model: Any, opt: Any, step: int) -> None:
    import torch

    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(step))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _state_bytes(model: Any, opt: Any) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for per in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in per.values() if hasattr(v, "numel"))
    return n


def _session(store: str, mode: bool, out: list[int], say: Callable[[str], None]) -> None:
    import colabjob

    model, opt = _model()
    with colabjob.session(
        store, every_steps=2, max_steps=4, log=None, platform="local",
        staging_dir=f"{store}-staging", async_checkpoint=mode, tensorboard=False,
    ) as s:  # fmt: skip
        s.track(model=model, optimizer=opt)
        _train_step(model, opt, 1)
        s.step()
        _train_step(model, opt, 2)
        base = _rss()  # training with its optimizer state, before any checkpoint
        for step in (2, 3, 4):
            if step > 2:
                _train_step(model, opt, step)
            if step % 2:
                s.step()
                continue
            with peak_extra(out, base):
                s.step()  # starts the checkpoint of this step
                pending = s.ctx.checkpoints.pending
                if pending is not None:
                    pending.wait()
        say(f"state {_state_bytes(model, opt)}")


def child(case: str, workdir: str) -> None:
    """One case in this (fresh) process; prints ``{"extra": bytes, "state": bytes}``."""
    import torch

    torch.set_num_threads(2)
    out: list[int] = []
    state = 0

    def note(line: str) -> None:
        nonlocal state
        state = int(line.split()[1])

    if case in ("async", "sync"):
        _session(os.path.join(workdir, f"job-{case}"), case == "async", out, note)
    elif case == "resume":
        from colabjob.jobs.state.restore import restore
        from colabjob.jobs.state.tracked import Tracked
        from colabjob.storage import open_store
        from colabjob.storage.checkpoints import CheckpointStore

        local = os.path.join(workdir, "fetched")
        CheckpointStore(open_store(os.path.join(workdir, "job-sync"))).fetch_latest(local)
        model, opt = _model()  # fresh, as a new session builds them: no optimizer state yet
        with peak_extra(out):
            restore(local, Tracked(model=model, optimizer=opt))  # what s.track() does once fetched
        state = _state_bytes(model, opt)
    else:
        model, opt = _model()
        _train_step(model, opt, 1)
        state = _state_bytes(model, opt)
        if case == "torch_save":
            with peak_extra(out):
                torch.save(
                    {"model": model.state_dict(), "optimizer": opt.state_dict()},
                    os.path.join(workdir, "plain.pt"),
                )
        else:
            import torch.distributed.checkpoint as dcp

            with peak_extra(out):
                fut = dcp.async_save(
                    {"model": model.state_dict(), "optimizer": opt.state_dict()},
                    checkpoint_id=os.path.join(workdir, "dcp"),
                )
                fut.result()
    print(json.dumps({"extra": max(out), "state": state}), flush=True)


def _run(case: str, workdir: str) -> dict[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", case, workdir],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = got["extra"] / got["state"]
    print(
        f"{case:>10}: extra {got['extra'] / 1e9:5.2f} GB of state {got['state'] / 1e9:.2f} GB"
        f" = {ratio:.2f}x ({time.monotonic() - t0:.0f} s)",
        flush=True,
    )
    return got


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="colabjob-bench-mem-") as workdir:
        got = {case: _run(case, workdir) for case in CASES}
    ratio = {k: round(v["extra"] / v["state"], 3) for k, v in got.items()}
    print(
        json.dumps(
            {
                "bench": "checkpoint_memory",
                "async_extra_vs_state": ratio["async"],
                "sync_extra_vs_state": ratio["sync"],
                "resume_extra_vs_state": ratio["resume"],
                "torch_save_extra_vs_state": ratio["torch_save"],
                "dcp_async_extra_vs_state": ratio["dcp_async"],
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
