"""Sharded state: an FSDP2 model and its optimizer written and read by every rank through
``torch.distributed.checkpoint`` (DCP).

A model is *sharded* when it is an ``FSDPModule`` (``fully_shard``) or holds ``DTensor``
parameters. Its weights and optimizer state then never exist whole on one rank: at a
checkpoint every rank writes its shards of the ``sharded_state`` view (the ``get_state_dict``
view: keys by parameter name, resharding on load) with DCP straight into the checkpoint's
``dcp/`` folder, in the background where host memory allows
(``colabjob.jobs.state.dcp_writer``); rank 0 then commits them next to the usual
``state.json``, each listed in the manifest with its size and sha256 like any other file.
``load_sharded`` reads them back on every rank with ``dcp.load`` + ``set_state_dict``, on
any number of processes (DCP reshards), and into a plain (unsharded) model too. DCP's
``.metadata`` file is a pickle: it is read by an unpickler that admits only DCP's own
metadata classes and plain containers, so a forged file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from colabjob.errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = [
    "SHARDED_DIR",
    "SHARDED_META",
    "is_sharded",
    "load_sharded",
    "saves_shards",
    "sharded_state",
]

SHARDED_DIR = "dcp"  # the checkpoint's folder of DCP files (``.metadata``, ``*.distcp``)
SHARDED_META = "sharded"  # state.json meta key: the model and optimizer are in SHARDED_DIR
_MODEL, _OPTIM = "model", "optimizer"


def is_sharded(model: torch.nn.Module | None) -> bool:
    """Whether ``model`` is FSDP2-sharded (an ``FSDPModule`` or ``DTensor`` parameters)."""
    if model is None:
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if isinstance(model, FSDPModule):
        return True
    return any(isinstance(p, DTensor) for p in model.parameters())


def saves_shards(model: torch.nn.Module | None, trainable_only: bool | None = None) -> bool:
    """Whether a checkpoint of ``model`` is written sharded: a parameter it saves is a
    ``DTensor``. It saves every parameter, or only the trainable ones when ``trainable_only``
    (``None``: when some parameter is frozen, as ``capture.snapshot`` decides). LoRA adapters
    added to a sharded frozen base are plain tensors, the same on every rank: saved whole."""
    if model is None:
        return False
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    partial = any(not p.requires_grad for p in params) if trainable_only is None else trainable_only
    return any(isinstance(p, DTensor) for p in params if p.requires_grad or not partial)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {_MODEL: get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {_MODEL: msd, _OPTIM: osd}


def sharded_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """This rank's ``get_state_dict`` view of ``model`` and ``optimizer``, as a checkpoint
    saves it (``colabjob.jobs.state.dcp_writer``) and ``load_sharded`` reads it."""
    return _state(model, optimizer)


def load_sharded(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, directory: Path
) -> None:
    """Every rank (or a single process): load the DCP files in ``directory`` into the live
    ``model`` and ``optimizer``, resharded for this run's processes."""
    if not (directory / ".metadata").is_file():
        raise CorruptCheckpointError(f"the sharded checkpoint lacks {SHARDED_DIR}/.metadata")
    state = _state(model, optimizer)
    try:
        with warnings.catch_warnings():
            # no process group: one process reads every shard, as meant (DCP warns anyway)
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, storage_reader=_SafeReader(directory), no_dist=not _in_group())
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as e:  # DCP wraps a rank's failure in CheckpointException
        if _REFUSED in str(e):
            raise UnsafeCheckpointError(f"sharded checkpoint refused: {e}") from e
        raise CorruptCheckpointError(f"the sharded checkpoint does not load: {e}") from e
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state[_MODEL])
        return
    set_state_dict(model, optimizer, model_state_dict=state[_MODEL], optim_state_dict=state[_OPTIM])


def _in_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


# ---- the .metadata pickle, read safely ------------------------------------------------------

_REFUSED = "refused (not DCP metadata)"
_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_ALLOWED = {
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"),  # a name -> torch.strided and the like
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch sizes and dtypes, plain containers; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        ok = (
            module in _ALLOWED_MODULES
            or (module, name) in _ALLOWED
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not ok:
            raise UnsafeCheckpointError(
                f"{SHARDED_DIR}/.metadata refers to {module}.{name}: {_REFUSED}"
            )
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through ``_MetadataUnpickler``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._root = Path(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        data = (self._root / ".metadata").read_bytes()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise CorruptCheckpointError(f"{SHARDED_DIR}/.metadata does not parse: {e}") from e
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"{SHARDED_DIR}/.metadata is not DCP metadata")
        meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        meta.load_id = self.load_id
        metadata.storage_meta = meta
        return metadata
