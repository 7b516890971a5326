"""Fixtures for the kinds / HF integration / demo tests: a step-count stop policy, a
``SegmentContext`` over a real store, a tiny GPT-2 with a tokenizer trained on the spot
(saved with ``save_pretrained``, loaded by path), text data files and spec builders.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

from colabjob.config import JobSpec
from colabjob.jobs.context import SegmentContext
from colabjob.jobs.policy import StopPolicy, StopReason
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "to", "park", "and",
    "bird", "sang", "in", "tall", "tree", "near", "river", "where", "fish", "swim", "under",
    "old", "bridge", "every", "morning",
)


class StopAfter(StopPolicy):
    """A StopPolicy that stops (reason ``budget``) after ``n`` optimizer steps; None: never."""

    def __init__(self, n: int | None) -> None:
        self.n, self.steps, self.checkpoints = n, 0, 0

    def observe_step(self, seconds: float) -> None:
        self.steps += 1

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        self.checkpoints += 1

    def should_stop(self) -> StopReason | None:
        return StopReason.BUDGET if self.n is not None and self.steps >= self.n else None


class KillAfter(StopAfter):
    """SIGKILLs this process after step ``kill_at``, once a background commit has been
    reaped: the kill then always finds a committed checkpoint behind it, however slow this
    machine is. On a slow machine the first reap may come only at the segment's end (the
    final save reaps the background commit before writing its own): the kill is then
    there, before the final commit, so it happens in every run. It never stops otherwise."""

    def __init__(self, kill_at: int) -> None:
        super().__init__(None)
        self.kill_at = kill_at

    def _kill_when_due(self) -> None:
        if self.steps >= self.kill_at and self.checkpoints >= 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def observe_step(self, seconds: float) -> None:
        super().observe_step(seconds)
        self._kill_when_due()

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        super().observe_checkpoint(
            write_seconds=write_seconds, upload_seconds=upload_seconds, nbytes=nbytes
        )
        self._kill_when_due()


def make_ctx(url: str | Path, policy: Any = None, **kw: Any) -> SegmentContext:
    store = open_store(str(url))
    return SegmentContext(
        store=store,
        checkpoints=CheckpointStore(store),
        policy=policy if policy is not None else StopAfter(None),
        **kw,
    )


def write_text_data(directory: Path, *, docs: int = 40, words: int = 60, seed: int = 0) -> Path:
    """``docs`` JSON lines of pseudo-sentences (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train.jsonl"
    with path.open("w") as f:
        for _ in range(docs):
            idx = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(WORDS[i] for i in idx)}) + "\n")
    return path


def tiny_model_dir(directory: Path, data: Path, *, vocab: int = 300, dropout: float = 0.1) -> Path:
    """A 2-layer GPT-2 plus a byte-level BPE tokenizer trained on ``data``, saved together."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from colabjob.jobs.data.tokenizer import train_bpe, wrap_tokenizer

    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    tok = wrap_tokenizer(train_bpe(texts, vocab_size=vocab, min_frequency=1))
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok),
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def spec_for(kind: str, *, model_dir: Path | None, data_path: Path, **sections: Any) -> JobSpec:
    doc: dict[str, Any] = {
        "job": {"name": f"t-{kind}", "kind": kind},
        "data": {"source": str(data_path), "seq_len": 32},
        "training": {"max_steps": 8, "batch_size": 2, "grad_accum": 2, "lr": 1e-3,
                     "warmup_steps": 2, "seed": 5, "log_every_steps": 1},
        "checkpoint": {"every_minutes": None},
    }
    if model_dir is not None:
        doc["model"] = {"name_or_path": str(model_dir)}
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.from_dict(doc)


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def sigkill_spec(kind: str, *, model_dir: Path, data_path: Path, fsdp: bool = False) -> JobSpec:
    """The small spec of each kind that the SIGKILL tests run (8 steps, dropout on);
    ``fsdp``: with ``training.fsdp``."""
    repo = Path(__file__).resolve().parents[2]
    extra: dict[str, Any] = {
        "finetune": {},
        "lora": {"lora": {"r": 4, "dropout": 0.1}},
        "scratch": {
            "model": {"architecture": "gpt2",
                      "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
            "tokenizer": {"train": {"vocab_size": 300, "min_frequency": 1}},
        },
        "python": {"job": {"entrypoint": f"{repo / 'examples' / 'my_train.py'}:main",
                           "args": {"hidden": 32, "layers": 1, "heads": 2, "dropout": 0.2}}},
    }[kind]
    if fsdp:
        extra = {**extra, "training": {"fsdp": True}}
    return spec_for(kind, model_dir=None if kind == "scratch" else model_dir,
                    data_path=data_path, **extra)
