"""Restoring training state: read a checkpoint directory back into freshly built objects.

``restore(directory, tracked, ...)`` (a ``colabjob.jobs.state.tracked.Tracked``) reads and
validates every file it needs first (format tag, batch ``Geometry``, the weights file's
header against the model's keys and shapes, optimizer state from ``optimizer.safetensors``
or an older checkpoint's ``optimizer.pt`` through ``safe_torch_load``, loader and extra
states), so a refused checkpoint leaves the objects untouched; then it loads them in place
and sets the RNGs last. Weights stream from their file a chunk at a time into the live
tensors, so a resume never holds two copies of the model. For a multi-process checkpoint it
picks the given rank's RNGs and loader position. It returns a ``Restored`` with the
counters, metrics and what changed.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from colabjob.errors import CheckpointError, CorruptCheckpointError, ResumeError
from colabjob.jobs.data.geometry import Geometry, check_geometry
from colabjob.jobs.state.codec import decode, read_json, read_tensors, safe_torch_load
from colabjob.jobs.state.format import (
    FORMAT,
    METRICS_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    TENSORS_FILE,
    Counters,
    Restored,
    model_keys,
)
from colabjob.jobs.state.rng import RngState, restore_rng
from colabjob.jobs.state.tensorfile import TensorFile
from colabjob.jobs.state.tracked import SCALER, Tracked

__all__ = ["check_model", "not_exact_because", "read_optimizer_state", "restore", "tensor_chunks"]


_CHUNK = 32 * 2**20  # bytes of weights handed to load_state_dict at a time


def check_model(model: torch.nn.Module, f: TensorFile, info: Mapping[str, Any]) -> None:
    """Refuse a weights file that does not fit ``model`` before any weight changes."""
    stored = set(f.keys())
    aliases = {a: k for a, k in info["aliases"].items() if k in stored}
    have = stored | set(aliases)
    missing = [k for k in model_keys(model, bool(info["trainable_only"])) if k not in have]
    if missing:
        raise ResumeError(
            f"the checkpoint lacks {len(missing)} tensor(s) this model trains, e.g. {missing[:3]}",
            hint="resume with the model and adapter (LoRA) configuration the job started with",
        )
    live = model.state_dict(keep_vars=True)
    unexpected = sorted(have - set(live))
    if unexpected:
        raise ResumeError(f"checkpoint has tensors this model lacks: {unexpected[:3]}")
    for key in have:
        shape = f.shape(aliases.get(key, key))
        if list(live[key].shape) != shape:
            raise ResumeError(
                f"checkpoint weights do not fit this model: {key!r} has shape {shape} "
                f"in the checkpoint, {list(live[key].shape)} in the model"
            )


def _load_model(model: torch.nn.Module, f: TensorFile, info: Mapping[str, Any]) -> None:
    """Load the weights a few tensors at a time (``load_state_dict`` per chunk, so module
    hooks still run): the extra memory is one chunk, not a second copy of the model."""
    for chunk in tensor_chunks(f, info["aliases"], limit=_CHUNK):
        model.load_state_dict(chunk, strict=False)


def tensor_chunks(
    f: TensorFile, aliases: Mapping[str, str], *, limit: int, clone_aliases: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """The file's tensors, each tied weight also under its ``aliases`` (``{alias: key}``),
    in dicts of about ``limit`` bytes; ``clone_aliases`` gives an alias its own copy (for
    loaders that fill each value in place)."""
    by_target: dict[str, list[str]] = {}
    for alias, key in aliases.items():
        by_target.setdefault(key, []).append(alias)
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for key in f.entries:
        t = f.get(key)
        chunk[key] = t
        for alias in by_target.get(key, ()):
            chunk[alias] = t.clone() if clone_aliases else t
        size += t.numel() * t.element_size()
        if size >= limit:
            yield chunk
            chunk, size = {}, 0
    if chunk:
        yield chunk


def read_optimizer_state(directory: str | os.PathLike[str]) -> Any:
    """The ``{"optimizer", "scheduler", "scaler"}`` state dicts of a checkpoint directory
    (either file format), without loading them into anything."""
    root = Path(directory)
    return _read_optimizer(root, read_json(root / STATE_FILE))


def _read_optimizer(root: Path, doc: Mapping[str, Any]) -> Any:
    name = doc.get("optimizer_file")
    if name is None:  # written before optimizer.safetensors existed
        return safe_torch_load(root / OPTIMIZER_FILE)
    with TensorFile(root / str(name)) as f:
        try:
            tree = json.loads(f.metadata["tree"])
        except (KeyError, ValueError) as e:
            raise CorruptCheckpointError(f"{name} lacks its state structure ({e})") from e
        return decode(tree, dict(f.items()))


def _require(saved: Any, what: str) -> Any:
    if saved is None:
        raise CheckpointError(
            f"the checkpoint holds no {what} state, but a {what} was passed to restore"
        )
    return saved


def restore(
    directory: str | os.PathLike[str],
    tracked: Tracked,
    *,
    allow_geometry_change: bool = False,
    restore_rngs: bool = True,
    rank: int = 0,
) -> Restored:
    """Load a ``write_snapshot`` directory into ``tracked``'s freshly built objects, in place
    (a slot left ``None``, or an extra not named, is not loaded).

    Every file is read and checked before any object changes, so a refused checkpoint
    (``UnsafeCheckpointError``, ``CorruptCheckpointError``, ``GeometryChangedError``) leaves
    them untouched. The RNGs are set last, so building objects after ``restore`` would
    consume the restored streams: build everything first. ``rank`` picks that process's
    RNGs and loader position from a multi-process checkpoint; a rank it has none for gets
    rank 0's position and keeps its RNGs (``Restored.rng_found`` is False).
    """
    model, loader, extras, geometry = (tracked.model, tracked.loader, tracked.extras,
                                       tracked.geometry)
    root = Path(directory)
    doc = read_json(root / STATE_FILE)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{STATE_FILE} is not a {FORMAT} document")
    saved_geometry = Geometry.from_dict(doc["geometry"]) if doc.get("geometry") else None
    changed: tuple[str, ...] = ()
    if geometry is not None and saved_geometry is not None:
        changed = check_geometry(saved_geometry, geometry, allow_change=allow_geometry_change)
    tensors = read_tensors(root / TENSORS_FILE) if (root / TENSORS_FILE).exists() else {}
    if model is not None:
        _require(doc.get("model"), "model")
        with TensorFile(root / MODEL_FILE) as weights:
            check_model(model, weights, doc["model"])
    opt_state: dict[str, Any] = {}
    if tracked.has_optimizer_state:
        _require(doc.get("optimizer"), "optimizer")
        opt_state = _read_optimizer(root, doc)
        if not isinstance(opt_state, dict):
            raise CorruptCheckpointError("the optimizer state is not a dict")
    rng_doc, rng_prefix, data_doc = doc.get("rng"), "rng/", doc.get("data")
    if rank:
        entry = (doc.get("ranks") or {}).get(str(rank))
        if entry is None:
            rng_doc = None
        else:
            rng_doc, rng_prefix, data_doc = entry["rng"], f"ranks/{rank}/rng/", entry["data"]
    data_state = decode(data_doc, tensors)
    extra_states = {}
    for name in extras:
        if name not in doc.get("extras", {}):
            raise CheckpointError(f"the checkpoint holds no state for extra object {name!r}")
        extra_states[name] = decode(doc["extras"][name], tensors)
    metrics = read_json(root / METRICS_FILE) if (root / METRICS_FILE).exists() else []

    if model is not None:
        with TensorFile(root / MODEL_FILE) as weights:
            _load_model(model, weights, doc["model"])
    for key, obj in tracked.optimizer_parts():
        if obj is not None:
            saved = _require(opt_state.get(key), key)
            if saved or key != SCALER:  # a disabled GradScaler saves {} and refuses to load it
                obj.load_state_dict(saved)
    if loader is not None:
        loader.load_state_dict(_require(data_state, "data loader"))
    for name, obj in extras.items():
        obj.load_state_dict(extra_states[name])
    if restore_rngs and rng_doc is not None:
        cut = len(rng_prefix)
        rng_tensors = {k[cut:]: v for k, v in tensors.items() if k.startswith(rng_prefix)}
        restore_rng(RngState.from_parts(rng_doc, rng_tensors))
    versions = dict(doc.get("versions") or {})
    for why in not_exact_because(versions, on_cpu=_on_cpu(model)):
        warnings.warn(why, RuntimeWarning, stacklevel=2)
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


def _on_cpu(model: torch.nn.Module | None) -> bool:
    param = next(iter(model.parameters()), None) if model is not None else None
    return param is not None and param.device.type == "cpu"


def not_exact_because(versions: dict[str, str], *, on_cpu: bool) -> list[str]:
    """Why a run resumed from a checkpoint with these ``versions`` will not be bit-identical
    to an uninterrupted one: another torch, or (training on the CPU, where a sum is split
    across the intra-op threads) another thread count."""
    out = []
    if versions.get("torch") not in (None, torch.__version__):
        out.append(
            f"checkpoint written with torch {versions['torch']}, running {torch.__version__}: "
            "the resumed run may not be bit-identical"
        )
    saved = versions.get("cpu_threads")
    if on_cpu and saved is not None and saved != str(torch.get_num_threads()):
        out.append(
            f"checkpoint written with {saved} CPU threads, running {torch.get_num_threads()}: "
            "on a CPU the sums differ in the last bits, so the resumed run is not "
            f"bit-identical; set OMP_NUM_THREADS={saved} for an exact resume"
        )
    return out
