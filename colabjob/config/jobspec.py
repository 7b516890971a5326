"""``JobSpec``: the whole job spec, joining the sections of config/schema.py, with the rules
that span sections (what each kind needs, LoRA-only and scratch-only settings, sequence length
against the model's positions, tokenizer against vocabulary) and the per-kind defaults that
make a minimal spec (job name and kind, model, data) work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from colabjob.config._fields import Section, _Mismatch
from colabjob.config.run_sections import BudgetSpec, CheckpointSpec, LoggingSpec
from colabjob.config.schema import (
    DataSpec,
    JobSection,
    LoraSpec,
    ModelSpec,
    TokenizerSpec,
    TrainingSpec,
)
from colabjob.errors import ConfigError

# Learning rates a spec gets when it names none: HF Trainer's for full fine-tuning, the usual
# LoRA rate, nanoGPT's for small models from scratch.
DEFAULT_LR: dict[str, float] = {"finetune": 5e-5, "lora": 2e-4, "scratch": 6e-4, "python": 1e-3}


@dataclass(frozen=True, kw_only=True)
class JobSpec(Section):
    """A whole job spec. Build with ``JobSpec.from_dict`` / ``load_spec``; ``to_dict`` is
    the snapshot kept in the job record."""

    job: JobSection
    model: ModelSpec | None = None
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec | None = None
    training: TrainingSpec = field(default_factory=TrainingSpec)
    lora: LoraSpec | None = None
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    # apprise URLs (colabjob.runner.notify). They hold tokens: never in the snapshot
    notify: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Validate a plain mapping (parsed YAML, or ``to_dict`` output) into a JobSpec."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a job spec must be a mapping of sections, got {type(data).__name__}",
                hint="start from `colabjob init`",
            )
        data = dict(data)
        job = data.get("job")
        kind = job.get("kind") if isinstance(job, Mapping) else None
        training = data.get("training")
        lr_missing = training is None or (isinstance(training, Mapping) and "lr" not in training)
        if isinstance(kind, str) and kind in DEFAULT_LR and lr_missing:
            data["training"] = {**(training or {}), "lr": DEFAULT_LR[kind]}
        try:
            return cls.from_mapping(data)
        except _Mismatch as m:  # only from a section that is not a mapping at the top level
            raise ConfigError(f"a section is malformed: expected {m.expected}") from None

    def to_dict(self) -> dict[str, Any]:
        """The snapshot kept in the job record: without ``notify``, whose URLs hold tokens
        (they come back on resume from ``--notify`` or ``COLABJOB_NOTIFY``)."""
        out = super().to_dict()
        out.pop("notify", None)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def kind(self) -> str:
        return self.job.kind

    def _check(self) -> None:
        kind = self.job.kind
        if kind != "python":
            if self.model is None:
                self._fail("model", f"required for kind {kind!r}", hint="e.g. model: gpt2")
            if self.data is None:
                self._fail(
                    "data",
                    f"required for kind {kind!r}",
                    hint="e.g. data: {source: data/train.jsonl}",
                )
        self._check_model(kind)
        if kind == "lora" and self.lora is None:
            object.__setattr__(self, "lora", LoraSpec())
        if kind != "lora" and self.lora is not None:
            self._fail(
                "lora",
                f"only for kind 'lora' (this job is {kind!r})",
                hint="remove it, or set job.kind: lora",
            )
        if kind != "lora" and self.checkpoint.final_artifact is not None:
            self._fail(
                "checkpoint.final_artifact",
                f"only for kind 'lora' (this job is {kind!r})",
                hint="remove checkpoint.final_artifact",
            )
        if kind == "lora" and self.checkpoint.final_artifact is None:
            object.__setattr__(
                self, "checkpoint", dataclasses.replace(self.checkpoint, final_artifact="adapter")
            )
        if self.model is not None and self.data is not None:
            limit = self.model.position_limit()
            if limit is not None and self.data.seq_len > limit:
                self._fail(
                    "data.seq_len",
                    f"{self.data.seq_len} is longer than the model's {limit} positions",
                    hint=f"set data.seq_len <= {limit}",
                )

    def _check_model(self, kind: str) -> None:
        model, tok = self.model, self.tokenizer
        if model is None:
            return
        if kind in ("finetune", "lora"):
            if model.name_or_path is None:
                hint = "e.g. model: gpt2"
                if model.architecture is not None:
                    hint = "model.architecture builds a fresh model: that is job.kind: scratch"
                self._fail("model.name_or_path", f"required for kind {kind!r}", hint=hint)
            if tok.train is not None:
                self._fail(
                    "tokenizer.train",
                    f"only for kind 'scratch' (this job is {kind!r})",
                    hint="a pretrained model keeps its own tokenizer; remove tokenizer.train",
                )
        if kind == "scratch":
            if model.name_or_path is None and model.architecture is None:
                self._fail(
                    "model",
                    "kind 'scratch' needs model.architecture (e.g. gpt2) or "
                    "model.name_or_path (a config to start from)",
                )
            if model.name_or_path is None and tok.name_or_path is None and tok.train is None:
                self._fail(
                    "tokenizer",
                    "kind 'scratch' with model.architecture needs a tokenizer",
                    hint="set tokenizer.name_or_path, or tokenizer.train: {vocab_size: 8192}",
                )
            vocab = model.config.get("vocab_size")
            if tok.train is not None and isinstance(vocab, int) and vocab < tok.train.vocab_size:
                self._fail(
                    "model.config.vocab_size",
                    f"{vocab} is smaller than tokenizer.train.vocab_size {tok.train.vocab_size}",
                    hint="raise model.config.vocab_size or leave it out",
                )
