"""Resume of a buffer-shuffled stream at sample 10 vs 10^5; what its buffer adds to a checkpoint.

The stream yields samples of 256 fp32 features plus a label (1,032 bytes of tensors each)
after ~0.2 ms of work per sample (reading and tokenizing stand-in), shuffled by
``ShuffledStream`` with a buffer of 1,000 samples over a ``ResumableIterable``; batch 10, a
tiny model, ``colabjob.session`` on a memory store. For each position the shuffled state at
that sample is built once (cheap samples), a one-step session commits a checkpoint there,
and a fresh session resumes from it: the time from the resume's start to the end of its
first training step (median of 9, the positions interleaved, after one untimed warm-up
resume). The resume reloads the buffer from the checkpoint and
reopens the source once, so it should not depend on the position (target: 10^5 <= 1.1x 10).

Checkpoint size: the same one-step checkpoint over the unshuffled ``ResumableIterable`` at
the same position is the baseline; the difference is the shuffle's extra, reported against
the buffered samples' own tensor bytes (1,000 x 1,032). Reports only; the last line holds
``resume_1e5_vs_10``, ``extra_bytes`` and ``extra_vs_buffer_bytes``.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import colabjob  # noqa: E402
from colabjob.jobs.context import SegmentContext  # noqa: E402
from colabjob.jobs.data import ResumableIterable, ShuffledStream, make_loader  # noqa: E402
from colabjob.jobs.session import Session  # noqa: E402
from colabjob.storage import open_store  # noqa: E402
from colabjob.storage.checkpoints import CheckpointStore  # noqa: E402

POSITIONS = (10, 100_000)
BUFFER = 1000
BATCH = 10
DIM = 256
SAMPLE_COST_S = 0.0002
RUNS = 9
_costly = [False]  # the state is built with cheap samples; the timed resumes pay the cost


def sample(i: int) -> dict[str, torch.Tensor]:
    if _costly[0]:
        end = time.perf_counter() + SAMPLE_COST_S
        while time.perf_counter() < end:
            pass
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randn(DIM, generator=g), "labels": torch.tensor(i % 3)}


SAMPLE_BYTES = sum(t.nbytes for t in sample(0).values())


def stream_from(offset: int) -> Iterator[dict[str, torch.Tensor]]:
    i = offset
    while True:
        yield sample(i)
        i += 1


def data(shuffled: bool) -> Any:
    source = ResumableIterable(stream_from)
    return ShuffledStream(source, buffer_size=BUFFER, seed=0) if shuffled else source


def state_at(position: int, shuffled: bool) -> dict[str, Any]:
    """The stream's state once ``position`` samples were yielded (minus one batch, which
    the checkpointing session trains on)."""
    stream = data(shuffled)
    if not shuffled:
        return {"epoch": 0, "position": position - BATCH}
    it = iter(stream)
    for _ in range(position - BATCH):
        next(it)
    return copy.deepcopy(stream.state_dict())


def _train(s: Session, state: dict[str, Any] | None, shuffled: bool) -> float:
    """Track fresh objects, train until the session stops; returns when (``perf_counter``)
    the first training step ended."""
    torch.manual_seed(0)
    model = nn.Linear(DIM, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = data(shuffled)
    if state is not None:
        stream.load_state_dict(copy.deepcopy(state))
    s.track(model=model, optimizer=opt, loader=make_loader(stream, batch_size=BATCH, seed=0))
    first = 0.0
    for batch in s.batches():
        loss = nn.functional.cross_entropy(model(batch["x"]), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        done = s.step(loss=loss.item())
        first = first or time.perf_counter()
        if done:
            break
    return first


def checkpoint_at(state: dict[str, Any], shuffled: bool) -> tuple[str, int]:
    """A one-step checkpoint at ``state`` (memory store); its URL and its files' bytes."""
    url = f"memory://shuffle-resume-{uuid.uuid4().hex}"
    store = open_store(url)
    ckpts = CheckpointStore(store)
    ctx = SegmentContext(store=store, checkpoints=ckpts, max_steps=1)
    _costly[0] = False
    with Session(ctx) as s:
        _train(s, state, shuffled)
    info = ckpts.latest()
    assert info is not None and info.step == 1
    return url, sum(int(f["size"]) for f in info.manifest["files"].values())


def resume_time(url: str) -> float:
    _costly[0] = True
    t0 = time.perf_counter()
    with colabjob.session(url, max_steps=2, log=None, platform="local") as s:
        first = _train(s, None, True)
    assert s.first_step == 1
    return first - t0


def main() -> None:
    torch.set_num_threads(1)
    states = {p: state_at(p, True) for p in POSITIONS}
    extra: dict[int, int] = {}
    for p in POSITIONS:
        _, size = checkpoint_at(states[p], True)
        _, plain = checkpoint_at(state_at(p, False), False)
        extra[p] = size - plain
    resume_time(checkpoint_at(states[10], True)[0])  # warm-up: first-use costs, not timed
    runs: dict[int, list[float]] = {p: [] for p in POSITIONS}
    for _ in range(RUNS):  # interleaved, so a noisy moment hits both positions alike
        for p in POSITIONS:
            runs[p].append(resume_time(checkpoint_at(states[p], True)[0]))
    times = {p: statistics.median(r) for p, r in runs.items()}
    buffer_bytes = BUFFER * SAMPLE_BYTES
    print(f"buffer {BUFFER} samples of {SAMPLE_BYTES} bytes, {SAMPLE_COST_S * 1e3:.1f} ms each")
    for p in POSITIONS:
        print(
            f"resume at sample {p:>7}: {times[p]:.3f} s; checkpoint +{extra[p]:,} bytes "
            f"({extra[p] / buffer_bytes:.3f}x the buffer's {buffer_bytes:,})"
        )
    result = {
        "bench": "shuffle_resume",
        "resume_1e5_vs_10": round(times[100_000] / times[10], 3),
        "resume_10_s": round(times[10], 4),
        "resume_1e5_s": round(times[100_000], 4),
        "extra_bytes": extra[100_000],
        "buffer_bytes": buffer_bytes,
        "extra_vs_buffer_bytes": round(extra[100_000] / buffer_bytes, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
