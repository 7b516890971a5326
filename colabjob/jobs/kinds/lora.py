"""``lora``: PEFT LoRA on a pretrained causal LM through HF Trainer.

The frozen base is loaded in the compute dtype (bf16/fp16 on a GPU, fp32 on CPU) unless
``model.dtype`` says otherwise; adapters go on ``lora.target_modules`` (``auto``: the table in
``colabjob.config.lora_targets`` by ``config.model_type``; a name the model lacks is a
``ConfigError``). Checkpoints hold only the trainable tensors (the adapters) and their
optimizer state: the snapshot keeps trainable parameters when part of the model is frozen.
The final artifact (``final/``) is the adapter (``adapter_config.json`` +
``adapter_model.safetensors``) or, with ``checkpoint.final_artifact: merged``, the base with
the adapters merged in, a plain model that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from colabjob.errors import ConfigError
from colabjob.jobs.defaults import DeviceCaps, choose_precision
from colabjob.jobs.kinds.hf_trainer import load_pretrained, plan_training, run_trainer

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.context import SegmentContext, SegmentOutcome

__all__ = ["add_adapters", "check_targets", "run"]


def check_targets(model: Any, spec: JobSpec) -> tuple[str, ...]:
    """The spec's LoRA target modules for ``model``; ConfigError naming any it lacks."""
    assert spec.lora is not None
    targets = spec.lora.modules_for(str(model.config.model_type))
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {missing} not in the model ({model.config.model_type})",
            hint="list module names the model has, e.g. "
            + ", ".join(sorted({n.rsplit('.', 1)[-1] for n in names if n})[:8]),
        )
    return targets


def add_adapters(model: Any, spec: JobSpec) -> Any:
    """``model`` wrapped by PEFT with the spec's LoRA adapters (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    assert spec.lora is not None
    targets = check_targets(model, spec)
    from transformers.pytorch_utils import Conv1D

    conv1d = any(  # GPT-2 style layers store weights transposed
        isinstance(mod, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, mod in model.named_modules()
    )
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=cast(Any, spec.lora.alpha),  # peft types it int; a float scales as well
        lora_dropout=spec.lora.dropout,
        target_modules=list(targets),
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def run(spec: JobSpec, ctx: SegmentContext) -> SegmentOutcome:
    assert spec.model is not None and spec.data is not None
    caps = DeviceCaps.detect()
    precision, _ = choose_precision(spec.training.precision, caps)
    tokenizer, dataset, base = load_pretrained(spec, precision, frozen_base=True)
    model = add_adapters(base, spec)
    plan = plan_training(spec, ctx, model, caps=caps)
    if plan.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input

    def save_model(trained: Any, directory: Path) -> None:
        if spec.checkpoint.final_artifact == "merged":
            trained.merge_and_unload().save_pretrained(directory)
        else:
            trained.save_pretrained(directory)

    return run_trainer(
        spec, ctx, model=model, tokenizer=tokenizer, dataset=dataset, plan=plan,
        save_model=save_model,
    )
