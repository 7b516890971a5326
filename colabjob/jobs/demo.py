"""The embedded demo: a real job that needs no download and proves the exact resume.

A small GPT-2 is trained from scratch (kind ``scratch``) on text every machine has: the
Python standard library's own source files (a deterministic, sorted selection of the
``*.py`` files directly under ``sysconfig.get_paths()["stdlib"]``), with a byte-level BPE
tokenizer trained on the spot. ``run_demo`` trains it in ``sessions`` simulated sessions,
each ended by a step budget with a committed checkpoint and resumed by the next, then trains
the same job uninterrupted and reports whether the final weights are bit-identical, with the
loss at the start and the end. ``DEMO_SIZES`` has a ``tiny`` size for tests and the
``default`` one (about a minute or two on two CPU cores). By default each session runs the
job kind directly in this process; ``colabjob demo`` passes ``segment=`` to run each as a
real runner segment (``colabjob.runner.demo_run``: job record, lease, the step budget as the
watchdog's extra policy), so ``colabjob status`` and ``plot`` work on the demo job.
"""

from __future__ import annotations

import json
import math
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.errors import ConfigError
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.policy import StopPolicy, StopReason

if TYPE_CHECKING:
    from colabjob.config import JobSpec

__all__ = [
    "DEMO_SIZES",
    "DemoReport",
    "DemoSize",
    "StepBudget",
    "WeightComparison",
    "compare_final_weights",
    "demo_spec",
    "prepare_demo",
    "run_demo",
    "stdlib_sources",
]


@dataclass(frozen=True, kw_only=True)
class DemoSize:
    """How big the demo is: data, tokenizer, model and run length."""

    files: int = 60
    max_bytes: int = 800_000
    vocab_size: int = 1024
    seq_len: int = 64
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    batch_size: int = 8
    grad_accum: int = 2
    steps: int = 240
    lr: float = 3e-3
    warmup_steps: int = 20
    log_every_steps: int = 10


DEMO_SIZES: dict[str, DemoSize] = {
    "default": DemoSize(),
    "tiny": DemoSize(
        files=12, max_bytes=120_000, vocab_size=320, seq_len=32, n_layer=1, n_embd=32,
        n_head=2, batch_size=4, grad_accum=2, steps=16, lr=5e-3, warmup_steps=2,
        log_every_steps=2,
    ),
}


class StepBudget(StopPolicy):
    """A ``StopPolicy`` that ends a simulated session after ``steps`` optimizer steps."""

    def __init__(self, steps: int) -> None:
        self.steps, self.seen = steps, 0

    def observe_step(self, seconds: float) -> None:
        self.seen += 1

    def should_stop(self) -> StopReason | None:
        return StopReason.BUDGET if self.seen >= self.steps else None


def stdlib_sources(files: int, max_bytes: int) -> list[tuple[str, str]]:
    """``(name, text)`` of the first ``files`` standard-library modules in name order,
    stopping before ``max_bytes`` of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str]] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if total + len(text) > max_bytes and out:
            break
        out.append((path.name, text))
        total += len(text)
        if len(out) >= files:
            break
    if not out:
        raise ConfigError(f"no Python sources under {root} for the demo")
    return out


def prepare_demo(directory: str | Path, size: DemoSize) -> tuple[Path, Path]:
    """Write the demo text (JSON lines, one module per line) and train its tokenizer once,
    so every run of the demo (split or not) uses the same vocabulary. Returns both paths."""
    from colabjob.jobs.data.tokenizer import train_bpe, wrap_tokenizer

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    sources = stdlib_sources(size.files, size.max_bytes)
    data = root / "stdlib.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for name, text in sources:
            f.write(json.dumps({"name": name, "text": text}) + "\n")
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tok = wrap_tokenizer(train_bpe((t for _, t in sources), vocab_size=size.vocab_size))
        tok.save_pretrained(tok_dir)
    return data, tok_dir


def demo_spec(data: Path, tokenizer: Path, size: DemoSize, *, name: str = "demo") -> JobSpec:
    """The demo's job spec (kind ``scratch``, GPT-2 architecture)."""
    from colabjob.config import JobSpec

    return JobSpec.from_dict(
        {
            "job": {"name": name, "kind": "scratch"},
            "model": {
                "architecture": "gpt2",
                "config": {"n_layer": size.n_layer, "n_embd": size.n_embd,
                           "n_head": size.n_head, "n_positions": size.seq_len},
            },
            "tokenizer": {"name_or_path": str(tokenizer)},
            "data": {"source": str(data), "seq_len": size.seq_len},
            "training": {
                "max_steps": size.steps, "batch_size": size.batch_size,
                "grad_accum": size.grad_accum, "lr": size.lr, "scheduler": "cosine",
                "warmup_steps": size.warmup_steps, "weight_decay": 0.1, "seed": 1234,
                "precision": "fp32", "log_every_steps": size.log_every_steps,
            },
            "checkpoint": {"every_minutes": None, "keep": 2},
            "budget": {"platform": "local"},
        }
    )


@dataclass(frozen=True, kw_only=True)
class DemoReport:
    """What the demo shows: per-session outcomes, bit-identity and the loss."""

    sessions: tuple[SegmentOutcome, ...]
    straight: SegmentOutcome | None
    identical: bool | None
    first_loss: float | None
    last_loss: float | None
    seconds: float

    def lines(self) -> list[str]:
        out = [
            f"session {i + 1}: steps {o.first_step}->{o.last_step}, stopped: {o.stop_reason}, "
            f"checkpoint {o.checkpoint_step}"
            for i, o in enumerate(self.sessions)
        ]
        if self.first_loss is not None and self.last_loss is not None:
            out.append(
                f"loss {self.first_loss:.3f} at the start -> {self.last_loss:.3f} at the end"
            )
        if self.identical is not None:
            verdict = "bit-identical" if self.identical else "DIFFERENT"
            out.append(f"final weights vs one uninterrupted run: {verdict}")
        out.append(f"{self.seconds:.0f} s in all")
        return out


def _local_segment(url: Path, spec: JobSpec, policy: StopPolicy, log: Any) -> SegmentOutcome:
    from colabjob.jobs.kinds import run_kind
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.store import open_store

    store = open_store(str(url))
    ctx = SegmentContext(
        store=store, checkpoints=CheckpointStore(store), policy=policy, log=log,
        max_steps=spec.training.max_steps,
    )
    return run_kind(spec, ctx)


@dataclass(frozen=True, kw_only=True)
class WeightComparison:
    """The final model tensors of two job roots compared bit for bit; truthy when identical.

    When they are not, ``str()`` says how: which tensors differ and by how much, so a failed
    exactness check tells a logic slip (large differences) from numerical noise (a few ulps)."""

    missing: str | None = None  # why nothing could be compared
    differing: tuple[str, ...] = ()
    total: int = 0
    max_abs: float = 0.0

    def __bool__(self) -> bool:
        return self.missing is None and not self.differing

    def __str__(self) -> str:
        if self.missing is not None:
            return f"not compared: {self.missing}"
        if not self.differing:
            return f"all {self.total} tensors bit-identical"
        shown = ", ".join(self.differing[:3]) + (", ..." if len(self.differing) > 3 else "")
        return (
            f"{len(self.differing)} of {self.total} tensors differ "
            f"(largest |difference| {self.max_abs:.3g}; {shown})"
        )


def compare_final_weights(a: str | Path, b: str | Path) -> WeightComparison:
    """The model tensors of the newest checkpoints of two job roots, compared bit for bit."""
    import torch
    from safetensors.torch import load_file

    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.store import open_store

    tensors = []
    with tempfile.TemporaryDirectory(prefix="colabjob-demo-") as tmp:
        for i, url in enumerate((a, b)):
            info = CheckpointStore(open_store(str(url))).fetch_latest(Path(tmp) / str(i))
            if info is None:
                return WeightComparison(missing=f"no checkpoint in {url}")
            tensors.append(load_file(str(Path(tmp) / str(i) / "model.safetensors")))
    x, y = tensors
    if x.keys() != y.keys():
        return WeightComparison(missing=f"different tensor names: {sorted(x.keys() ^ y.keys())}")
    differing = tuple(k for k in sorted(x) if not torch.equal(x[k], y[k]))
    worst = max(
        (float((x[k].double() - y[k].double()).abs().max()) for k in differing
         if x[k].shape == y[k].shape),
        default=0.0,
    )
    return WeightComparison(differing=differing, total=len(x), max_abs=worst)


def _losses(url: Path) -> list[float]:
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.store import open_store

    cs = CheckpointStore(open_store(str(url)))
    info = cs.latest()
    if info is None:
        return []
    rows = json.loads(cs.read(info, "metrics.json"))
    return [float(r["loss"]) for r in rows if isinstance(r, dict) and "loss" in r]


def run_demo(
    root: str | Path,
    *,
    size: str | DemoSize = "default",
    sessions: int = 3,
    compare: bool = True,
    log: Callable[[str], None] | None = print,
    segment: Callable[..., SegmentOutcome] | None = None,
) -> DemoReport:
    """Run the demo under ``root`` (data, tokenizer, ``job/`` and ``straight/``); give a fresh
    directory (a job already there is resumed, not restarted).

    ``segment(url, spec, policy, verbose=...)`` runs one session that must stop when
    ``policy`` says so (default: the job kind directly, in this process); ``verbose`` is
    False for the uninterrupted comparison run, whose lines are not shown.
    """
    t0 = time.monotonic()
    sz = DEMO_SIZES[size] if isinstance(size, str) else size
    if sessions < 1:
        raise ConfigError(f"sessions must be >= 1, got {sessions}")
    root = Path(root)
    data, tok = prepare_demo(root, sz)
    spec = demo_spec(data, tok, sz)
    def run_one(url: Path, sp: JobSpec, pol: StopPolicy, *, verbose: bool) -> SegmentOutcome:
        if segment is not None:
            return segment(url, sp, pol, verbose=verbose)
        return _local_segment(url, sp, pol, log if verbose else None)

    per = math.ceil(sz.steps / sessions)
    outcomes: list[SegmentOutcome] = []
    for i in range(sessions):
        outcome = run_one(root / "job", spec, StepBudget(per), verbose=True)
        outcomes.append(outcome)
        if log is not None:
            log(f"session {i + 1}/{sessions}: steps {outcome.first_step}->{outcome.last_step} "
                f"({outcome.stop_reason}), checkpoint {outcome.checkpoint_step} committed")
        if outcome.completed:
            break
    straight = identical = None
    if compare:
        if log is not None:
            log("the same job again, uninterrupted, to compare the final weights")
        straight = run_one(root / "straight", spec, StepBudget(sz.steps + 1), verbose=False)
        comparison = compare_final_weights(root / "job", root / "straight")
        identical = bool(comparison)
        if not identical and log is not None:
            log(f"final weights: {comparison}")
    losses = _losses(root / "job")
    report = DemoReport(
        sessions=tuple(outcomes),
        straight=straight,
        identical=identical,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        seconds=time.monotonic() - t0,
    )
    if log is not None:
        for line in report.lines()[len(outcomes):]:
            log(line)
    return report
