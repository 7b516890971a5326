"""Sharding a model over the processes with FSDP2, the way a job spec's ``training.fsdp`` asks.

``shard_model(model)`` applies ``torch.distributed.fsdp.fully_shard`` to each block of the
model's outermost ``nn.ModuleList`` children (a transformer's layers: ``transformer.h``,
``model.layers``), then to the model itself, so each block's weights are gathered only
while it computes. Call it after the process group is up and *before* building the
optimizer (sharding replaces the parameters). With one process it returns the model
unchanged: there is nothing to shard over, and a sharded checkpoint loads into a whole
model (``colabjob.jobs.state.sharded``). The Session then saves and resumes the sharded
state with DCP on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from colabjob.jobs.distributed import World
from colabjob.jobs.state.sharded import is_sharded

__all__ = ["blocks", "shard_model"]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the model's outermost ``nn.ModuleList``s, in module order."""
    found: list[nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, nn.ModuleList):
            inside.append(name)
            found.extend(module.children())
    return found


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` sharded over the process group (see the module docstring); unchanged with
    one process or when it is sharded already."""
    if World.current().world_size < 2 or is_sharded(model):
        return model
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model
