"""How big a segment's checkpoints will be, before one is written.

The stop rule (``colabjob.runner.budget``) reserves time for the final save; before a save is
measured it guesses that time from the expected size (``StopPolicy.expect_checkpoint``).
``checkpoint_nbytes`` gives that size from the live objects: the model tensors a checkpoint
holds (only the trainable ones and the buffers when some parameters are frozen, as
``jobs.state.capture.snapshot`` saves them; tied tensors once) plus the optimizer state. Before the
optimizer's first step its state is still empty, so it is guessed as two fp32 moments per
trainable parameter (AdamW; more than SGD needs). Sums of tensor sizes only: cheap enough for
a step boundary, no copies.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["checkpoint_nbytes", "model_nbytes", "optimizer_nbytes"]


def model_nbytes(model: torch.nn.Module, *, trainable_only: bool | None = None) -> int:
    """Bytes of the model tensors a checkpoint holds (see the module docstring)."""
    params = list(model.parameters())
    partial = (
        any(not p.requires_grad for p in params) if trainable_only is None else trainable_only
    )
    seen: set[tuple[int, int]] = set()
    total = 0
    tensors = [p for p in params if p.requires_grad or not partial]
    for t in [*tensors, *model.buffers()]:
        # A DTensor (FSDP2) has no storage of its own: its local shard's identifies it, and
        # its numel is the whole tensor's (rank 0 commits every rank's shards).
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (
            (local.untyped_storage().data_ptr(), int(local.storage_offset()))
            if local.numel()
            else (id(t), 0)
        )
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _trainable_numel(model: torch.nn.Module | None, optimizer: Any) -> int:
    if optimizer is not None:
        return sum(
            p.numel() for g in optimizer.param_groups for p in g["params"] if p.requires_grad
        )
    if model is None:
        return 0
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer_nbytes(optimizer: Any, *, model: torch.nn.Module | None = None) -> int:
    """Bytes of the optimizer state; guessed (two fp32 moments per trainable parameter)
    while the optimizer has not stepped yet."""
    if optimizer is None:
        return 0
    state = getattr(optimizer, "state", None) or {}
    total = 0
    for per_param in state.values():
        if isinstance(per_param, dict):
            for v in per_param.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    if total == 0:
        total = 8 * _trainable_numel(model, optimizer)
    return total


def checkpoint_nbytes(
    model: torch.nn.Module | None, optimizer: Any = None, *, trainable_only: bool | None = None
) -> int:
    """Expected bytes of one checkpoint: model tensors plus optimizer state."""
    size = 0 if model is None else model_nbytes(model, trainable_only=trainable_only)
    return size + optimizer_nbytes(optimizer, model=model)
