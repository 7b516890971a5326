"""The shared path of the Trainer-based kinds (``finetune``, ``lora``, ``scratch``).

Each kind builds its model and tokenizer; this module does the rest the same way for all:
pick precision, gradient checkpointing and the micro-batch (``jobs.defaults``; a searched
micro-batch is recorded in every checkpoint and reused on resume), build the dataset
(``jobs.datasets``) and the ``TrainingArguments`` from the spec, run a ``ColabJobTrainer``
(``jobs.hf``) for one segment and, once the job completes, commit the final artifact
(``colabjob.jobs.kinds.final``).
With several processes every rank trains (``training.batch_size`` is per process) and rank 0
alone commits the final artifact.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from colabjob.errors import ConfigError
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.defaults import (
    DeviceCaps,
    choose_precision,
    needs_gradient_checkpointing,
    resource_line,
    search_micro_batch,
)
from colabjob.jobs.kinds.final import FINAL_DIR, final_artifact
from colabjob.jobs.state.sharded import is_sharded

if TYPE_CHECKING:
    from colabjob.config import JobSpec

__all__ = [
    "Plan",
    "load_model",
    "load_pretrained",
    "load_tokenizer",
    "plan_training",
    "run_trainer",
    "say",
    "weights_dtype",
]

_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def say(ctx: SegmentContext, message: str) -> None:
    if ctx.log is not None:
        ctx.log(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """How this segment trains: precision, checkpointing and batch geometry."""

    precision: str
    gradient_checkpointing: bool
    micro_batch: int
    grad_accum: int
    notes: tuple[str, ...] = ()


def weights_dtype(spec: JobSpec, precision: str, *, frozen_base: bool) -> torch.dtype:
    """``model.dtype``; ``auto``: fp32 master weights, or the compute dtype for a frozen
    (LoRA) base, whose weights never receive an update."""
    assert spec.model is not None
    if spec.model.dtype != "auto":
        return _DTYPES[spec.model.dtype]
    return _DTYPES[precision] if frozen_base else torch.float32


def _saved_batch(ctx: SegmentContext) -> dict[str, int] | None:
    info = ctx.checkpoints.latest()
    batch = info.meta.get("batch") if info is not None else None
    return batch if isinstance(batch, dict) and "micro_batch" in batch else None


def _try_batch(model: Any, *, seq_len: int, vocab: int, precision: str) -> Callable[[int], None]:
    device = next(model.parameters()).device
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def attempt(size: int) -> None:
        reserve = torch.empty(trainable * 8, dtype=torch.uint8, device=device)  # AdamW moments
        try:
            ids = torch.randint(0, vocab, (size, seq_len), device=device)
            dtype = _DTYPES.get(precision, torch.float32)
            with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            del reserve

    return attempt


def _checkpointing(model: Any, on: bool) -> None:
    """Turn activation (gradient) checkpointing on or off, by the name this version has."""
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else (
        "gradient_checkpointing"
    )
    method = getattr(model, f"{name}_{'enable' if on else 'disable'}", None)
    if callable(method):
        method()


def plan_training(
    spec: JobSpec, ctx: SegmentContext, model: Any, *, caps: DeviceCaps | None = None
) -> Plan:
    """Precision, gradient checkpointing and micro-batch for this segment (logged)."""
    assert spec.model is not None and spec.data is not None
    caps = caps or DeviceCaps.detect()
    tr = spec.training
    precision, p_why = choose_precision(tr.precision, caps)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nbytes = next(model.parameters()).element_size()
    gc_on, gc_why = needs_gradient_checkpointing(
        spec.model.gradient_checkpointing,
        caps=caps,
        params=params,
        trainable=trainable,
        bytes_per_param=nbytes,
    )
    notes = [p_why, gc_why]
    micro, accum = tr.batch_size, tr.grad_accum
    saved = _saved_batch(ctx)
    if saved is not None:
        micro, accum = int(saved["micro_batch"]), int(saved["grad_accum"])
        if micro * accum != tr.effective_batch_size:
            raise ConfigError(
                f"the job's checkpoints use {micro} x {accum} samples per step, the spec "
                f"{tr.effective_batch_size}",
                hint="keep training.batch_size x training.grad_accum as the job started",
            )
        notes.append(f"micro-batch {micro} x {accum} accumulation (from the checkpoint)")
    elif tr.auto_batch_size and caps.kind == "cuda" and is_sharded(model):
        notes.append(f"auto_batch_size: not searched for a sharded model, micro-batch {micro} "
                     f"x {accum} as given")
    elif tr.auto_batch_size and caps.kind == "cuda":
        model.to("cuda")  # the Trainer would move it there anyway
        if gc_on:
            _checkpointing(model, True)
        vocab = int(model.get_input_embeddings().weight.shape[0])
        try_batch = _try_batch(model, seq_len=spec.data.seq_len, vocab=vocab, precision=precision)
        try:
            choice = search_micro_batch(tr.effective_batch_size, try_batch)
        except ConfigError:
            if gc_on or spec.model.gradient_checkpointing != "auto":
                raise
            gc_on = True
            notes.append("gradient checkpointing on (auto: a micro-batch of 1 did not fit)")
            _checkpointing(model, True)
            choice = search_micro_batch(tr.effective_batch_size, try_batch)
        finally:
            _checkpointing(model, False)  # the Trainer turns it on again from the arguments
        micro, accum = choice.micro_batch, choice.grad_accum
        notes.append(f"micro-batch {micro} x {accum} accumulation (searched {list(choice.tried)})")
    elif tr.auto_batch_size:
        notes.append(f"auto_batch_size: no GPU, micro-batch {micro} x {accum} as given")
    return Plan(
        precision=precision,
        gradient_checkpointing=gc_on,
        micro_batch=micro,
        grad_accum=accum,
        notes=tuple(notes),
    )


def training_arguments(spec: JobSpec, plan: Plan, output_dir: str) -> Any:
    """``TrainingArguments`` for one segment of a spec (no HF saving, logging or reporting)."""
    from transformers import TrainingArguments

    assert spec.data is not None
    tr = spec.training
    length: dict[str, Any] = (
        {"max_steps": tr.max_steps} if tr.max_steps is not None else {"num_train_epochs": tr.epochs}
    )
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in fields else (
        "gradient_checkpointing"
    )
    length[ckpt_key] = plan.gradient_checkpointing
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=tr.lr,
        lr_scheduler_type=_SCHEDULERS[tr.scheduler],
        warmup_steps=tr.warmup_steps,
        weight_decay=tr.weight_decay,
        max_grad_norm=tr.max_grad_norm if tr.max_grad_norm is not None else 0.0,
        seed=tr.seed,
        data_seed=spec.data.seed if spec.data.seed is not None else tr.seed,
        fp16=plan.precision == "fp16",
        bf16=plan.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=tr.log_every_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=tr.num_workers,
        remove_unused_columns=False,
        train_sampling_strategy="random" if spec.data.shuffle else "sequential",
        **length,
    )


def run_trainer(
    spec: JobSpec,
    ctx: SegmentContext,
    *,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    plan: Plan,
    save_model: Callable[[Any, Path, bool], None] | None = None,
) -> SegmentOutcome:
    """One segment through ``ColabJobTrainer``; on completion the final artifact, committed
    under ``final/``, is the trained model (``save_model(trainer.model, directory, main)``,
    by default its ``save_pretrained``; see ``_final_artifact``) and the tokenizer, as
    ``save_pretrained`` writes it."""
    from transformers import default_data_collator
    from transformers.utils import logging as hf_logging

    from colabjob.jobs.hf.trainer import ColabJobTrainer

    hf_logging.disable_progress_bar()  # progress goes through ctx.log

    for note in plan.notes:
        say(ctx, note)
    say(ctx, resource_line(ctx.staging_dir or tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix="colabjob-out-", dir=ctx.staging_dir) as out:
        trainer = ColabJobTrainer(
            model=model,
            args=training_arguments(spec, plan, out),
            train_dataset=dataset,
            data_collator=default_data_collator,
            processing_class=tokenizer,
            segment=ctx,
            checkpoint_meta={"batch": {"micro_batch": plan.micro_batch,
                                       "grad_accum": plan.grad_accum}},
        )
        trainer.train()
        outcome = trainer.colabjob_outcome
        assert outcome is not None
        say(ctx, resource_line(out))
        if outcome.completed:
            info = final_artifact(ctx, outcome.last_step, trainer.model, tokenizer, save_model)
            if info is not None:
                say(ctx, f"final artifact of step {info.step} committed to "
                         f"{FINAL_DIR}/{info.prefix}")
    return outcome


def load_pretrained(spec: JobSpec, precision: str, *, frozen_base: bool) -> tuple[Any, Any, Any]:
    """The tokenizer, the tokenized data and the pretrained model (in ``weights_dtype``,
    loaded after seeding): what the finetune and lora kinds start from."""
    from transformers import set_seed

    tokenizer, dataset = load_pretrained_data(spec)
    set_seed(spec.training.seed)
    model = load_model(spec, weights_dtype(spec, precision, frozen_base=frozen_base))
    return tokenizer, dataset, model


def load_pretrained_data(spec: JobSpec) -> tuple[Any, Any]:
    """The tokenizer of a pretrained model (or ``spec.tokenizer``) and the spec's data,
    tokenized: what the finetune and lora kinds start from."""
    from colabjob.jobs.data.text import build_dataset

    assert spec.model is not None and spec.data is not None
    name = spec.tokenizer.name_or_path or spec.model.name_or_path
    assert name is not None
    tokenizer = load_tokenizer(
        name, revision=spec.model.revision, trust=spec.model.trust_remote_code
    )
    return tokenizer, build_dataset(spec.data, tokenizer)


def load_tokenizer(name: str, *, revision: str | None = None, trust: bool = False) -> Any:
    """A tokenizer by path or hub name, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"tokenizer: cannot load {name!r}: {e}",
            hint="give a local directory saved with save_pretrained, or a hub name",
        ) from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: JobSpec, dtype: torch.dtype, *, shard: bool | None = None) -> Any:
    """``model.name_or_path`` as a causal LM in ``dtype`` (ConfigError when it cannot load);
    sharded with FSDP2 as it loads when ``shard`` (default ``training.fsdp``) and there are
    several processes (``colabjob.jobs.hf.fsdp``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from colabjob.jobs.hf.fsdp import fsdp_config

    assert spec.model is not None
    m, name = spec.model, spec.model.name_or_path
    assert name is not None
    kw: dict[str, Any] = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    try:
        if spec.training.fsdp if shard is None else shard:
            config = AutoConfig.from_pretrained(name, **kw)
            dc = fsdp_config(config, trust_remote_code=m.trust_remote_code)
            kw["config"] = config  # read once
            if dc is not None:
                kw["distributed_config"] = dc
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path: cannot load {m.name_or_path!r} as a causal LM: {e}",
            hint="give a local directory saved with save_pretrained, or a hub model name",
        ) from e
    return model
