"""``scratch``: a causal LM built from a config and trained from random weights.

The config is ``model.architecture`` (a ``model_type``, e.g. ``gpt2``; GPT-2 when a spec
gives only ``model.config``) or the config at ``model.name_or_path`` (weights are not
loaded), with ``model.config`` overrides. The tokenizer is ``tokenizer.name_or_path``, the
one at ``model.name_or_path``, or a byte-level BPE trained on the job's data before step 0
(``tokenizer.train``) and kept in the job's storage so every session uses the same one
(with several processes rank 0 trains or loads it first, the others then load it).
Unless given, ``vocab_size`` is the tokenizer's and the position limit covers
``data.seq_len``. Weights are initialised from ``training.seed``; checkpoints hold the whole
model (with ``training.fsdp`` on several processes, every rank's shards); the final artifact
(``final/``) is the model and tokenizer via ``save_pretrained``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from colabjob.errors import ConfigError
from colabjob.jobs.data.text import build_dataset, iter_texts
from colabjob.jobs.data.tokenizer import load_or_train_tokenizer
from colabjob.jobs.defaults import DeviceCaps
from colabjob.jobs.distributed import Coordinator
from colabjob.jobs.hf.fsdp import shard_built
from colabjob.jobs.kinds.hf_trainer import load_tokenizer, plan_training, run_trainer, say

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.context import SegmentContext, SegmentOutcome

__all__ = ["build_config", "build_tokenizer", "run"]

_POSITION_KEYS = ("n_positions", "max_position_embeddings")


def build_config(spec: JobSpec, tokenizer: Any) -> Any:
    """The model config: architecture or loaded config, overrides, tokenizer-derived fields."""
    from transformers import AutoConfig

    assert spec.model is not None and spec.data is not None
    m = spec.model
    overrides = dict(m.config)
    try:
        if m.name_or_path is not None:
            cfg = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
            for key, value in overrides.items():
                setattr(cfg, key, value)
        else:
            cfg = AutoConfig.for_model(m.architecture or "gpt2", **overrides)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"model: cannot build a config: {e}") from e
    vocab = len(tokenizer)
    if "vocab_size" not in overrides:
        cfg.vocab_size = vocab
    elif int(cfg.vocab_size) < vocab:
        raise ConfigError(
            f"model.config.vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab}",
            hint=f"raise it to at least {vocab} or leave it out",
        )
    for key in _POSITION_KEYS:
        if hasattr(cfg, key) and key not in overrides and getattr(cfg, key) < spec.data.seq_len:
            setattr(cfg, key, spec.data.seq_len)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            setattr(cfg, key, int(value))
    return cfg


def build_tokenizer(spec: JobSpec, ctx: SegmentContext) -> Any:
    """The job's tokenizer (see the module docstring)."""
    assert spec.model is not None and spec.data is not None
    tok_spec = spec.tokenizer
    if tok_spec.train is not None:
        sync = Coordinator.current()
        if sync is not None and sync.rank != 0:  # rank 0 stores it first; then the same one
            error = sync.broadcast(None)
            if error is not None:
                raise ConfigError(f"rank 0 could not make the job's tokenizer: {error}")
        try:
            tokenizer, trained = load_or_train_tokenizer(
                ctx.store,
                iter_texts(spec.data),
                vocab_size=tok_spec.train.vocab_size,
                min_frequency=tok_spec.train.min_frequency,
            )
        except BaseException as e:
            if sync is not None and sync.rank == 0:
                sync.broadcast(f"{type(e).__name__}: {e}")
            raise
        if sync is not None and sync.rank == 0:
            sync.broadcast(None)
        say(ctx, f"tokenizer: byte-level BPE, {len(tokenizer)} tokens "
                 f"({'trained on the data' if trained else 'the job’s stored one'})")
        return tokenizer
    name = tok_spec.name_or_path or spec.model.name_or_path
    if name is None:
        raise ConfigError("tokenizer: give tokenizer.name_or_path or tokenizer.train")
    return load_tokenizer(name, trust=spec.model.trust_remote_code)


def run(spec: JobSpec, ctx: SegmentContext) -> SegmentOutcome:
    from transformers import AutoModelForCausalLM, set_seed

    assert spec.model is not None and spec.data is not None
    tokenizer = build_tokenizer(spec, ctx)
    cfg = build_config(spec, tokenizer)
    dataset = build_dataset(spec.data, tokenizer)
    set_seed(spec.training.seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if spec.training.fsdp:  # every rank built the same weights: each keeps its shards
        model = shard_built(model)
    n = sum(p.numel() for p in model.parameters())
    say(ctx, f"model: {cfg.model_type} from scratch, {n / 1e6:.2f}M parameters")
    plan = plan_training(spec, ctx, model, caps=DeviceCaps.detect())
    return run_trainer(spec, ctx, model=model, tokenizer=tokenizer, dataset=dataset, plan=plan)
