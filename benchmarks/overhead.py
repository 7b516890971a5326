"""Steps per second of a tiny model in the Session loop vs the same loop bare.

A small MLP (128 -> 512 -> 512 -> 10, AdamW, batch 64, in-memory data, one thread: a step
of a few ms, far shorter than any LLM step) trains in loops that differ only in what
surrounds the step:

- ``bare``: a plain ``torch.utils.data.DataLoader(shuffle=True)``, what a user writes, and
  ``bare_twin``, an identical second copy of it, whose ratio to ``bare`` shows the noise
  floor of the measurement on this machine;
- ``bare_resumable``: the same bare loop over colabjob's resumable loader (``make_loader``);
- ``session``: ``colabjob.session(...)`` with ``s.track(...)``, ``s.batches()`` and
  ``s.step(loss=...)`` every step; checkpoints off (no ``every_steps``/``every_minutes``,
  no budget), so what is measured is the per-step cost of the API: counting, metrics,
  the watchdog's stop and checkpoint checks.

On a shared machine absolute speeds wander, so the loops advance in alternating chunks of
20 steps (rotating order) and each ratio is the median over rounds of the per-round ratio
of the time each loop spent in the same stretch of wall time. Also printed: the cost of one
``s.step()`` call timed alone. Reports only (target ``session_vs_bare`` >= 0.99).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import colabjob  # noqa: E402
from colabjob.jobs.data import make_loader  # noqa: E402

N, DIM, BATCH = 8192, 128, 64
CHUNK, ROUNDS, WARMUP_ROUNDS = 20, 100, 3


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(N, DIM, generator=g), torch.randint(0, 10, (N,), generator=g)
    )


Shared = tuple[nn.Module, torch.optim.Optimizer]


def model_and_optimizer() -> Shared:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(DIM, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def plain_loader(data: torch.utils.data.Dataset) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, generator=g)


def bare(loader: torch.utils.data.DataLoader, shared: Shared) -> Iterator[None]:
    model, opt = shared
    while True:
        for x, y in loader:
            loss = train_step(model, opt, x, y)
            loss.item()  # a loop logs its loss; the session loop does the same
            yield


IN_STEP: list[float] = []  # seconds spent inside s.step(), per call, in the session loop


def session(stack: ExitStack, shared: Shared) -> Iterator[None]:
    model, opt = shared
    url = f"memory://overhead-{uuid.uuid4().hex}"
    s = stack.enter_context(colabjob.session(url, every_minutes=None, log=None, platform="local"))
    s.track(model=model, optimizer=opt, loader=make_loader(dataset(), batch_size=BATCH, seed=0))
    for x, y in s.batches():
        loss = train_step(model, opt, x, y)
        value = loss.item()
        t0 = time.perf_counter()
        s.step(loss=value)
        IN_STEP.append(time.perf_counter() - t0)
        yield


def step_call_cost() -> float:
    """Microseconds per ``s.step()`` at a boundary, timed alone (no training)."""
    with colabjob.session(f"memory://overhead-{uuid.uuid4().hex}", log=None) as s:
        s.track(model=nn.Linear(2, 2), batch_size=BATCH)
        n = 20_000
        t0 = time.perf_counter()
        for _ in range(n):
            s.step(loss=1.0, samples=BATCH)
        return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    torch.set_num_threads(1)
    data = dataset()
    shared = model_and_optimizer()  # one model for all loops: equal memory placement
    with ExitStack() as stack:
        loops = {
            "bare": bare(plain_loader(data), shared),
            "bare_twin": bare(plain_loader(data), shared),
            "bare_resumable": bare(make_loader(data, batch_size=BATCH, seed=0), shared),
            "session": session(stack, shared),
        }
        names = list(loops)
        rounds: list[dict[str, float]] = []
        for r in range(WARMUP_ROUNDS + ROUNDS):
            times: dict[str, float] = {}
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
                loop = loops[name]
                t0 = time.perf_counter()
                for _ in range(CHUNK):
                    next(loop)
                times[name] = time.perf_counter() - t0
            if r >= WARMUP_ROUNDS:
                rounds.append(times)
    steps = CHUNK * ROUNDS
    for name in names:
        total = sum(t[name] for t in rounds)
        print(f"{name:>15}: {steps / total:8.1f} steps/s ({steps} steps)")

    def ratio(base: str, other: str = "session") -> float:
        """Median over rounds of (base time / other time), i.e. other's speed relative to
        base: robust to a round in which another process took the CPU from one loop."""
        return statistics.median(t[base] / t[other] for t in rounds)

    cost = step_call_cost()
    in_loop = statistics.mean(IN_STEP[WARMUP_ROUNDS * CHUNK :]) * 1e6
    bare_us = statistics.median(t["bare"] for t in rounds) / CHUNK * 1e6
    print(
        f"s.step(): {in_loop:.1f} us per call inside the training loop (cold caches), "
        f"{cost:.1f} us in a tight loop; a bare training step: {bare_us:.0f} us"
    )
    result = {
        "bench": "overhead",
        "session_vs_bare": round(ratio("bare"), 4),
        "session_vs_bare_resumable": round(ratio("bare_resumable"), 4),
        "noise_floor_twin_vs_bare": round(ratio("bare", "bare_twin"), 4),
        "step_call_us_in_loop": round(in_loop, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
