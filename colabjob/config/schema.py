"""The sections of the job spec: one frozen, keyword-only dataclass per YAML section
(``job``, ``model``, ``tokenizer``, ``data``, ``training``, ``lora``; ``checkpoint``,
``budget`` and ``logging`` are config/run_sections.py's), each with its defaults and the rules
that involve only its own fields. ``JobSpec`` (config/jobspec.py) joins them. Nothing here
imports torch or transformers: fast CLI commands load specs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from colabjob.config._fields import (
    Section,
)
from colabjob.config.lora_targets import resolve_target_modules

Kind = Literal["finetune", "lora", "scratch", "python"]
KINDS: tuple[str, ...] = ("finetune", "lora", "scratch", "python")
Dtype = Literal["auto", "fp32", "fp16", "bf16"]
Platform = Literal[
    "auto",
    "colab",
    "colab-free",
    "colab-pro",
    "colab-pro+",
    "kaggle",
    "kaggle-tpu",
    "slurm",
    "gce",
    "local",
]


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_ENTRYPOINT = re.compile(r"(?P<module>[A-Za-z_][\w.]*|[^:]+\.py):(?P<function>[A-Za-z_]\w*)")
_TEXT_SUFFIXES = (".txt", ".text", ".md")
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_LOCAL_PREFIXES = ("/", "./", "../", "~", "file://")


def looks_local(source: str) -> bool:
    """Whether a model/data/tokenizer reference is a local path rather than a hub name."""
    return (
        source.startswith(_LOCAL_PREFIXES)
        or any(c in source for c in "*?[")
        or os.path.exists(source)
    )


@dataclass(frozen=True, kw_only=True)
class JobSection(Section):
    """``job``: what this job is called, which built-in job it runs, where it lives."""

    _path: ClassVar[str] = "job"
    name: str
    kind: Kind
    storage: str | None = None
    entrypoint: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def _check(self) -> None:
        if not _NAME.fullmatch(self.name):
            self._fail(
                "name",
                f"{self.name!r} is not a usable job name",
                hint="use letters, digits, '.', '_' and '-' (up to 100), starting with a letter "
                "or digit",
            )
        if self.storage is not None and not self.storage.strip():
            self._fail("storage", "is empty", hint="give a path or URL, or remove the key")
        if self.kind == "python":
            if self.entrypoint is None:
                self._fail(
                    "entrypoint",
                    "required for kind 'python'",
                    hint="e.g. entrypoint: my_train:main",
                )
            if not _ENTRYPOINT.fullmatch(self.entrypoint):
                self._fail(
                    "entrypoint",
                    f"{self.entrypoint!r} is not 'module:function'",
                    hint="e.g. my_package.train:main or train.py:main",
                )
        else:
            if self.entrypoint is not None:
                self._fail(
                    "entrypoint",
                    f"only for kind 'python' (this job is {self.kind!r})",
                    hint="remove it, or set job.kind: python",
                )
            if self.args:
                self._fail(
                    "args", f"only for kind 'python' (this job is {self.kind!r})", hint="remove it"
                )


@dataclass(frozen=True, kw_only=True)
class ModelSpec(Section):
    """``model``: weights to start from (or an architecture for ``scratch``), how to load them."""

    _path: ClassVar[str] = "model"
    _shorthand: ClassVar[str | None] = "name_or_path"
    name_or_path: str | None = None
    architecture: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dtype: Dtype = "auto"
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False

    def _check(self) -> None:
        if self.name_or_path is not None and not self.name_or_path.strip():
            self._fail("name_or_path", "is empty", hint="a hub name such as gpt2 or a local path")
        if self.name_or_path is not None and self.architecture is not None:
            self._fail(
                "architecture",
                "give either model.name_or_path or model.architecture, not both",
                hint="architecture builds a fresh config by model type (scratch); "
                "name_or_path loads one",
            )

    def position_limit(self) -> int | None:
        """The longest sequence ``config`` allows, when it says."""
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = self.config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainSpec(Section):
    """``tokenizer.train``: a tokenizer trained on the job's data (``scratch`` only)."""

    _path: ClassVar[str] = "tokenizer.train"
    vocab_size: int = 8192
    kind: Literal["byte-level-bpe"] = "byte-level-bpe"
    min_frequency: int = 2

    def _check(self) -> None:
        if self.vocab_size < 260:
            self._fail(
                "vocab_size",
                f"must be at least 260 (256 bytes + special tokens), got {self.vocab_size}",
            )
        if self.min_frequency < 1:
            self._fail("min_frequency", f"must be at least 1, got {self.min_frequency}")


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec(Section):
    """``tokenizer``: by default the model's own; or another by name/path; or trained here."""

    _path: ClassVar[str] = "tokenizer"
    _shorthand: ClassVar[str | None] = "name_or_path"
    name_or_path: str | None = None
    train: TokenizerTrainSpec | None = None

    def _check(self) -> None:
        if self.name_or_path is not None and self.train is not None:
            self._fail("train", "give either tokenizer.name_or_path or tokenizer.train, not both")


@dataclass(frozen=True, kw_only=True)
class DataSpec(Section):
    """``data``: where the text comes from and how it becomes fixed-length samples."""

    _path: ClassVar[str] = "data"
    _shorthand: ClassVar[str | None] = "source"
    source: str
    format: Literal["auto", "text", "jsonl", "parquet", "hf"] = "auto"
    split: str = "train"
    config_name: str | None = None
    streaming: bool = False
    text_field: str = "text"
    packing: bool = True
    seq_len: int = 1024
    shuffle: bool = True
    seed: int | None = None

    def _check(self) -> None:
        if not self.source.strip():
            self._fail(
                "source", "is empty", hint="a local .txt/.jsonl/.parquet path or a hub dataset name"
            )
        if self.seq_len < 2:
            self._fail("seq_len", f"must be at least 2, got {self.seq_len}")
        for name in ("split", "text_field"):
            if not getattr(self, name).strip():
                self._fail(name, "is empty")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            self._fail("seed", f"must be in [0, 2**32), got {self.seed}")

    @property
    def source_format(self) -> Literal["text", "jsonl", "parquet", "hf"]:
        """``format``, or when ``auto``: by file suffix; a local path without one is text."""
        if self.format != "auto":
            return self.format
        lowered = self.source.lower()
        if lowered.endswith(_TEXT_SUFFIXES):
            return "text"
        if lowered.endswith(_JSONL_SUFFIXES):
            return "jsonl"
        if lowered.endswith(".parquet"):
            return "parquet"
        return "text" if looks_local(self.source) else "hf"

    @property
    def is_local(self) -> bool:
        return self.source_format != "hf"


@dataclass(frozen=True, kw_only=True)
class TrainingSpec(Section):
    """``training``: length, batch geometry, optimizer and schedule, precision, seed,
    sharding (``fsdp``)."""

    _path: ClassVar[str] = "training"
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: Dtype = "auto"
    seed: int = 42
    auto_batch_size: bool = False
    num_workers: int = 0
    log_every_steps: int = 10
    # shard weights and optimizer state over the processes (FSDP2); kind 'python' only
    fsdp: bool = False

    def _check(self) -> None:
        if self.max_steps is not None and self.epochs is not None:
            self._fail(
                "max_steps",
                "give exactly one of training.max_steps and training.epochs",
                hint="remove one (with --set: training.epochs=null)",
            )
        if self.max_steps is None and self.epochs is None:
            object.__setattr__(self, "epochs", 1.0)
        positive = {
            "max_steps": self.max_steps,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "lr": self.lr,
            "log_every_steps": self.log_every_steps,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                self._fail(name, f"must be greater than 0, got {value}")
        for name in ("warmup_steps", "weight_decay", "num_workers"):
            if getattr(self, name) < 0:
                self._fail(name, f"must not be negative, got {getattr(self, name)}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            self._fail(
                "max_grad_norm",
                f"must be greater than 0, got {self.max_grad_norm}",
                hint="use null to turn gradient clipping off",
            )
        if not 0 <= self.seed < 2**32:
            self._fail("seed", f"must be in [0, 2**32), got {self.seed}")

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step (per process): batch_size x grad_accum."""
        return self.batch_size * self.grad_accum


@dataclass(frozen=True, kw_only=True)
class LoraSpec(Section):
    """``lora``: adapter shape and where the adapters go (``kind: lora`` only)."""

    _path: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | Literal["auto"] = "auto"

    def _check(self) -> None:
        if self.r < 1:
            self._fail("r", f"must be at least 1, got {self.r}")
        if self.alpha <= 0:
            self._fail("alpha", f"must be greater than 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            self._fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, tuple) and not all(
            m.strip() for m in self.target_modules
        ):
            self._fail("target_modules", "has an empty name")
        if self.target_modules == ():
            self._fail("target_modules", "is empty", hint="use auto or list module names")

    def modules_for(self, model_type: str) -> tuple[str, ...]:
        """The target modules: the listed ones, or the defaults for ``model_type``."""
        if self.target_modules == "auto":
            return resolve_target_modules(model_type)
        return self.target_modules
