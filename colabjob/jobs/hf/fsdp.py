"""FSDP2 for the HF-Trainer kinds, on transformers' own distributed loading.

``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`` shards a model
with FSDP2 as it loads (``fully_shard`` per the model's ``fsdp_plan``; each rank keeps only
its shards), and the Trainer knows such a model: it neither wraps it in DDP nor moves it,
defers the gradient reduction to the end of an accumulation window, and keeps LoRA adapters
added after sharding identical on every rank. That is the engine used here, on every backend:
accelerate's FSDP plugin switches on only on GPU backends, so on CPU it would silently run
plain DDP.

What colabjob adds: a plan for architectures whose class has none (GPT-2's blocks are
``transformer.h``, not ``layers``): each outermost ``nn.ModuleList`` block its own FSDP
unit, as ``colabjob.jobs.sharding`` does for the ``python`` kind; a model built from a
config (``scratch``) sharded the same way (``shard_built``); shards that own their memory
(``own_storage``, at ``train()``); and checkpoints of the sharded state through the Trainer mixin
(``colabjob.jobs.hf.trainer``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from colabjob.jobs.distributed import World
from colabjob.jobs.sharding import block_lists

__all__ = ["block_plan", "fsdp_config", "own_storage", "shard_built"]

log = logging.getLogger(__name__)

_FREE = "free_full_weight"  # transformers' FSDP style: reshard after the block's forward


def block_plan(model: torch.nn.Module) -> dict[str, str]:
    """FSDP rules for ``model``'s outermost block lists its own plan does not cover (the
    class's ``fsdp_plan``, whose rules may name modules another architecture has)."""
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    names = {replace_layer_number_by_wildcard(n) for n, _ in model.named_modules()}
    own = {k for k in (getattr(model, "fsdp_plan", None) or {}) if k in names}
    return {f"{name}.*": _FREE for name, _ in block_lists(model) if f"{name}.*" not in own}


def fsdp_config(config: Any, *, trust_remote_code: bool = False) -> Any:
    """The ``DistributedConfig`` that shards a causal LM of ``config`` over every process
    (None with one process: nothing to shard over, the model stays whole)."""
    world = World.current().world_size
    if world < 2:
        return None
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    try:
        with torch.device("meta"):  # only the module tree: no memory, no init
            skeleton = AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code
            )
        plan = block_plan(skeleton)
    except Exception as e:  # a model that cannot be built on meta: its class's plan only
        log.warning("training.fsdp: no block plan for %s (%s); its own plan is used",
                    getattr(config, "model_type", "this model"), e)
        plan = {}
    return DistributedConfig(fsdp_size=world, fsdp_plan=plan or None)


def shard_built(model: Any) -> Any:
    """A model built in this process (every rank the same, e.g. seeded ``from_config``)
    sharded like a loaded one: its weights handed to ``from_pretrained`` with the
    ``DistributedConfig``. Holds the whole model and this rank's shards while it runs."""
    dc = fsdp_config(model.config)
    if dc is None:
        return model
    return type(model).from_pretrained(
        None, config=model.config, state_dict=model.state_dict(), distributed_config=dc,
        dtype=model.dtype,
    )


def own_storage(model: torch.nn.Module) -> None:
    """Give every shard a storage of its own. transformers 5.24 keeps a weight it loads
    without a dtype conversion (on CPU) as a view of this rank's rows into the whole tensor,
    so every rank would hold the whole model, and copying such a view for a background save
    fails. The compact copies go in with ``load_state_dict(assign=True)``, which FSDP2
    supports (it re-points its shards at the next forward); tied weights stay one parameter.
    The Trainer mixin calls it at ``train()`` before the optimizer is built (the parameters
    are new objects), for the kinds' models and a user's alike."""
    from torch import nn
    from torch.distributed.tensor import DTensor

    made: dict[int, torch.Tensor] = {}
    swap: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, DTensor):
            continue
        local = t.to_local()
        if local.untyped_storage().nbytes() <= local.numel() * local.element_size():
            continue  # owns its memory already
        if id(t) not in made:
            new = DTensor.from_local(
                local.clone(), t.device_mesh, t.placements, run_check=False,
                shape=t.shape, stride=t.stride(),
            )
            made[id(t)] = (
                nn.Parameter(new, requires_grad=t.requires_grad)
                if isinstance(t, nn.Parameter) else new
            )
        swap[name] = made[id(t)]
    if swap:
        model.load_state_dict(swap, strict=False, assign=True)
