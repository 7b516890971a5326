"""Time to the first resumed training step at sample 10, 10^4 and 10^5 of a stream.

The data is an ``IterableDataset`` whose samples cost ~0.2 ms each to produce (a busy loop
standing in for reading and tokenizing), batch 10, a tiny model. For each position a
checkpoint is made there first, then a fresh run resumes from it and the time from the
start of the resume to the end of the first training step is measured.

- ``ours``: ``colabjob.session`` (memory store) with the stream wrapped in a
  ``ResumableIterable``, which reopens the source at the saved offset: the time should not
  depend on the position (target: 10^5 <= 1.1x of 10). Median of 5.
- ``hf``: HF Trainer's own resume (``train(resume_from_checkpoint=...)``) of the same
  stream as a plain ``IterableDataset``: for a checkpoint at ``global_step`` it rebuilds the
  data position by iterating and discarding the first ``global_step`` batches
  (``accelerate.skip_first_batches``), so every skipped sample is produced again. The
  checkpoint is written by the Trainer itself (``_save_checkpoint`` at that step). One run
  per position (10^5 alone replays 10^5 samples, ~20 s).

Reports only; the last line holds ``ours_1e5_vs_10`` and ``hf_1e5_vs_10``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402

import colabjob  # noqa: E402
from colabjob.jobs.context import SegmentContext  # noqa: E402
from colabjob.jobs.data import ResumableIterable, make_loader  # noqa: E402
from colabjob.jobs.session import Session  # noqa: E402
from colabjob.storage import open_store  # noqa: E402
from colabjob.storage.checkpoints import CheckpointStore  # noqa: E402

POSITIONS = (10, 10_000, 100_000)
BATCH = 10
SAMPLE_COST_S = 0.0002
DIM = 16
OUR_RUNS = 5


def sample(i: int) -> dict[str, torch.Tensor]:
    """Item ``i`` of the stream, after ~0.2 ms of work."""
    end = time.perf_counter() + SAMPLE_COST_S
    while time.perf_counter() < end:
        pass
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randn(DIM, generator=g), "labels": torch.tensor(i % 3)}


def stream_from(offset: int) -> Iterator[dict[str, torch.Tensor]]:
    i = offset
    while True:
        yield sample(i)
        i += 1


class Stream(torch.utils.data.IterableDataset):
    """The same stream without any state: all HF Trainer can do is replay it."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return stream_from(0)


class TinyConfig(PretrainedConfig):
    model_type = "colabjob-bench-tiny"


class TinyModel(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(DIM, 3)
        self.post_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.head(x)
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _train(s: Session, position: int | None = None) -> float:
    """Track fresh objects (a fresh stream set at ``position``), train until the session
    stops; returns when (``perf_counter``) the first training step ended."""
    torch.manual_seed(0)
    model = TinyModel(TinyConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = ResumableIterable(stream_from)
    if position is not None:
        data.load_state_dict({"epoch": 0, "position": position})
    s.track(model=model, optimizer=opt, loader=make_loader(data, batch_size=BATCH, seed=0))
    first = 0.0
    for batch in s.batches():
        loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        done = s.step(loss=loss.item())
        first = first or time.perf_counter()
        if done:
            break
    return first


def bench_ours(position: int) -> float:
    times = []
    for _ in range(OUR_RUNS):
        url = f"memory://resume-{uuid.uuid4().hex}"
        store = open_store(url)
        # a checkpoint after the batch ending at `position`, written by the Session layer
        ctx = SegmentContext(store=store, checkpoints=CheckpointStore(store), max_steps=1)
        with Session(ctx) as s:
            _train(s, position - BATCH)
        t0 = time.perf_counter()
        with colabjob.session(url, max_steps=2, log=None, platform="local") as s:
            first = _train(s)
        assert s.first_step == 1
        times.append(first - t0)
    return statistics.median(times)


def bench_hf(position: int, scratch: Path) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    step = position // BATCH
    out = scratch / f"hf-{position}"

    def trainer(max_steps: int, callbacks: list[Any] | None = None) -> Trainer:
        torch.manual_seed(0)
        args = TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=BATCH,
            max_steps=max_steps,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        t = Trainer(
            model=TinyModel(TinyConfig()), args=args, train_dataset=Stream(), callbacks=callbacks
        )
        t.remove_callback(PrinterCallback)  # no metrics printout
        return t

    first = trainer(step + 1)
    first.create_optimizer_and_scheduler(num_training_steps=step + 1)
    first.state.global_step = step
    first.state.train_batch_size = BATCH
    first.state.max_steps = step + 1
    first._save_checkpoint(first.model, trial=None)
    checkpoint = out / f"checkpoint-{step}"

    times: list[float] = []

    class FirstStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            times.append(time.perf_counter())
            control.should_training_stop = True
            return control

    resumed = trainer(step + 1, callbacks=[FirstStep()])
    t0 = time.perf_counter()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    return times[0] - t0


def main() -> None:
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    (REPO / ".bench").mkdir(exist_ok=True)
    ours = {p: bench_ours(p) for p in POSITIONS}
    with tempfile.TemporaryDirectory(prefix="resume_latency-", dir=REPO / ".bench") as tmp:
        hf = {p: bench_hf(p, Path(tmp)) for p in POSITIONS}
    print(f"stream: {SAMPLE_COST_S * 1e3:.1f} ms per sample, batch {BATCH}")
    for p in POSITIONS:
        print(f"resume at sample {p:>7}: ours {ours[p]:.3f} s, HF Trainer {hf[p]:.3f} s")
    result = {
        "bench": "resume_latency",
        "ours_1e5_vs_10": round(ours[100_000] / ours[10], 3),
        "hf_1e5_vs_10": round(hf[100_000] / hf[10], 3),
        "ours_1e4_vs_10": round(ours[10_000] / ours[10], 3),
        "hf_1e4_vs_10": round(hf[10_000] / hf[10], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
