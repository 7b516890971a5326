"""Restoring training state: read a checkpoint directory back into freshly built objects.

``restore(directory, ...)`` reads and validates every file it needs first (format tag,
batch ``Geometry``, weights, optimizer state through ``safe_torch_load``, loader and extra
states), so a refused checkpoint leaves the objects untouched; then it loads them in place
and sets the RNGs last. For a multi-process checkpoint it picks the given rank's RNGs and
loader position. It returns a ``Restored`` with the counters, metrics and what changed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from colabjob.errors import CheckpointError, CorruptCheckpointError, ResumeError
from colabjob.jobs.formats import decode, read_json, read_tensors, safe_torch_load
from colabjob.jobs.geometry import Geometry, check_geometry
from colabjob.jobs.rng import RngState, restore_rng
from colabjob.jobs.state_format import (
    FORMAT,
    METRICS_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    TENSORS_FILE,
    Counters,
    Restored,
    Stateful,
    model_keys,
)

__all__ = ["restore"]


def _load_model(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], info: Mapping[str, Any]
) -> None:
    full = dict(tensors)
    for alias, key in info["aliases"].items():
        full[alias] = tensors[key]
    trainable_only = bool(info["trainable_only"])
    missing = [k for k in model_keys(model, trainable_only) if k not in full]
    if missing:
        raise ResumeError(
            f"the checkpoint lacks {len(missing)} tensor(s) this model trains, e.g. {missing[:3]}",
            hint="resume with the model and adapter (LoRA) configuration the job started with",
        )
    try:
        result = model.load_state_dict(full, strict=not trainable_only)
    except RuntimeError as e:
        raise ResumeError(f"checkpoint weights do not fit this model: {e}") from e
    if result.unexpected_keys:
        raise ResumeError(f"checkpoint has tensors this model lacks: {result.unexpected_keys[:3]}")


def _require(saved: Any, what: str) -> Any:
    if saved is None:
        raise CheckpointError(
            f"the checkpoint holds no {what} state, but a {what} was passed to restore"
        )
    return saved


def restore(
    directory: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    loader: Stateful | None = None,
    geometry: Geometry | None = None,
    allow_geometry_change: bool = False,
    extras: Mapping[str, Stateful] | None = None,
    restore_rngs: bool = True,
    rank: int = 0,
) -> Restored:
    """Load a ``write_snapshot`` directory into freshly built objects, in place.

    Every file is read and checked before any object changes, so a refused checkpoint
    (``UnsafeCheckpointError``, ``CorruptCheckpointError``, ``GeometryChangedError``) leaves
    them untouched. The RNGs are set last, so building objects after ``restore`` would
    consume the restored streams: build everything first. ``rank`` picks that process's
    RNGs and loader position from a multi-process checkpoint; a rank it has none for gets
    rank 0's position and keeps its RNGs (``Restored.rng_found`` is False).
    """
    root = Path(directory)
    doc = read_json(root / STATE_FILE)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{STATE_FILE} is not a {FORMAT} document")
    saved_geometry = Geometry.from_dict(doc["geometry"]) if doc.get("geometry") else None
    changed: tuple[str, ...] = ()
    if geometry is not None and saved_geometry is not None:
        changed = check_geometry(saved_geometry, geometry, allow_change=allow_geometry_change)
    tensors = read_tensors(root / TENSORS_FILE) if (root / TENSORS_FILE).exists() else {}
    model_tensors = None
    if model is not None:
        _require(doc.get("model"), "model")
        model_tensors = read_tensors(root / MODEL_FILE)
    opt_state: dict[str, Any] = {}
    if optimizer is not None or scheduler is not None or scaler is not None:
        _require(doc.get("optimizer"), "optimizer")
        opt_state = safe_torch_load(root / OPTIMIZER_FILE)
        if not isinstance(opt_state, dict):
            raise CorruptCheckpointError(f"{OPTIMIZER_FILE} does not hold a dict")
    rng_doc, rng_prefix, data_doc = doc.get("rng"), "rng/", doc.get("data")
    if rank:
        entry = (doc.get("ranks") or {}).get(str(rank))
        if entry is None:
            rng_doc = None
        else:
            rng_doc, rng_prefix, data_doc = entry["rng"], f"ranks/{rank}/rng/", entry["data"]
    data_state = decode(data_doc, tensors)
    extra_states = {}
    for name in extras or {}:
        if name not in doc.get("extras", {}):
            raise CheckpointError(f"the checkpoint holds no state for extra object {name!r}")
        extra_states[name] = decode(doc["extras"][name], tensors)
    metrics = read_json(root / METRICS_FILE) if (root / METRICS_FILE).exists() else []

    if model is not None and model_tensors is not None:
        _load_model(model, model_tensors, doc["model"])
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if obj is not None:
            saved = _require(opt_state.get(key), key)
            if saved or key != "scaler":  # a disabled GradScaler saves {} and refuses to load it
                obj.load_state_dict(saved)
    if loader is not None:
        loader.load_state_dict(_require(data_state, "data loader"))
    for name, obj in (extras or {}).items():
        obj.load_state_dict(extra_states[name])
    if restore_rngs and rng_doc is not None:
        cut = len(rng_prefix)
        rng_tensors = {k[cut:]: v for k, v in tensors.items() if k.startswith(rng_prefix)}
        restore_rng(RngState.from_parts(rng_doc, rng_tensors))
    versions = dict(doc.get("versions") or {})
    if versions.get("torch") not in (None, torch.__version__):
        warnings.warn(
            f"checkpoint written with torch {versions['torch']}, running {torch.__version__}: "
            "the resumed run may not be bit-identical",
            RuntimeWarning,
            stacklevel=2,
        )
    return Restored(
        counters=Counters.from_dict(doc["counters"]),
        metrics=list(metrics),
        geometry=saved_geometry,
        geometry_changed=changed,
        meta=dict(doc.get("meta") or {}),
        versions=versions,
        world_size=int(doc.get("world_size", 1)),
        rng_found=rng_doc is not None,
    )
