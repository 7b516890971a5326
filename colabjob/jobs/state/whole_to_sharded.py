"""A whole (unsharded) checkpoint loaded into a sharded (FSDP2) model and its optimizer.

A checkpoint written by one process or by ``DistributedDataParallel`` holds the whole
model in ``model.safetensors`` and the optimizer state, keyed by parameter index, in the
optimizer file (``colabjob.jobs.state.format``). A run that resumes it with an FSDP2
(``fully_shard``) model cannot load those into ``DTensor`` parameters directly:
``load_whole`` checks the weights against the model (keys and global shapes, like a plain
restore) and hands them to DCP's ``set_model_state_dict`` / ``set_optimizer_state_dict``
as *full* state dicts, which keep on each rank only its own shards. The optimizer's
parameter indices become the parameter names DCP expects, in the order the live optimizer
holds its parameters (the order a single process built it in). Every rank reads the whole
files (each fetched the checkpoint): while loading, a rank holds one chunk of the weights
and the whole optimizer state besides its shards.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import torch

from colabjob.errors import CorruptCheckpointError, ResumeError
from colabjob.jobs.state.codec import read_json
from colabjob.jobs.state.format import MODEL_FILE, STATE_FILE
from colabjob.jobs.state.restore import check_model, read_optimizer_state, tensor_chunks
from colabjob.jobs.state.tensorfile import TensorFile

__all__ = ["load_whole"]

_CHUNK = 64 * 2**20  # bytes of whole weights handed to DCP at a time


def load_whole(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, directory: Path
) -> None:
    """Every rank, together: the whole weights and optimizer state of the checkpoint in
    ``directory`` into the live sharded ``model`` and ``optimizer`` (see the module
    docstring). Raises ``ResumeError`` when they do not fit this model, before any
    weight changes."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    info = (read_json(directory / STATE_FILE) or {}).get("model")
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"{STATE_FILE} does not describe the model's weights")
    osd = None
    if optimizer is not None:
        osd = _by_name(model, optimizer, read_optimizer_state(directory).get("optimizer"))
    # trainable-only checkpoints (adapters) hold a subset of the keys: the rest stays
    options = StateDictOptions(full_state_dict=True, strict=False)
    with TensorFile(directory / MODEL_FILE) as f:
        check_model(model, f, info)
        # DCP distributes each value in place: a tied weight's aliases get their own copy
        for chunk in tensor_chunks(f, info.get("aliases", {}), limit=_CHUNK, clone_aliases=True):
            # its value type is a union wider than Tensor, and dict is invariant
            set_model_state_dict(model, cast("dict[str, Any]", chunk), options=options)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=options)


def _by_name(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: Any
) -> dict[str, Any]:
    """A whole optimizer state dict keyed by parameter index, rekeyed by parameter name
    (the live optimizer's parameter order gives each index its parameter)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        raise CorruptCheckpointError("the checkpoint holds no optimizer state dict")
    names = {id(p): n for n, p in model.named_parameters()}
    order: list[str] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ResumeError("the optimizer holds a parameter that is not the model's")
            order.append(names[id(p)])
    groups = saved["param_groups"]
    saved_ids = [i for g in groups for i in g.get("params", ())]
    if sorted(saved_ids) != list(range(len(order))) or len(groups) != len(
        optimizer.param_groups
    ):
        raise ResumeError(
            f"the checkpoint's optimizer state has {len(saved_ids)} parameter(s) in "
            f"{len(groups)} group(s); this optimizer has {len(order)} in "
            f"{len(optimizer.param_groups)}",
            hint="build the optimizer as the job that wrote the checkpoint did",
        )
    state = copy.copy(saved.get("state") or {})
    return {
        "state": {order[int(i)]: s for i, s in state.items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups],
    }
