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

__all__ = ["block_lists", "blocks", "shard_model"]


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's outermost ``nn.ModuleList``s (a transformer's layers), by name."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if isinstance(module, nn.ModuleList):
            found.append((name, module))
    return found


def blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the model's outermost ``nn.ModuleList``s, in module order."""
    return [block for _, blocks_ in block_lists(model) for block in blocks_.children()]


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
