"""LoRA ``target_modules: auto``: which modules get adapters, per ``config.model_type``.
The attention projections (all four where they are separate), following what PEFT and
axolotl users expect; an architecture not listed needs an explicit list in the spec.
"""

from __future__ import annotations

from colabjob.errors import ConfigError

# LoRA ``target_modules: auto``: attention projections per ``config.model_type``.
LORA_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj"),
    "gpt_bigcode": ("c_attn", "c_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "olmo2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "stablelm": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
    "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gpt_neo": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "phi3": ("qkv_proj", "o_proj"),
}


def resolve_target_modules(model_type: str) -> tuple[str, ...]:
    """LoRA target modules for a ``config.model_type``; ConfigError when we know none."""
    key = model_type.strip().lower()
    if key not in LORA_TARGET_MODULES:
        raise ConfigError(
            f"lora.target_modules: no default for model type {model_type!r}",
            hint="list the module names in lora.target_modules, e.g. [q_proj, v_proj]; "
            f"defaults exist for: {', '.join(sorted(LORA_TARGET_MODULES))}",
        )
    return LORA_TARGET_MODULES[key]
