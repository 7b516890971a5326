"""Capturing training state: copy it to CPU memory, then write it as plain files.

``snapshot(tracked, ...)`` runs on the training thread at an optimizer-step boundary and
returns a ``Snapshot`` of detached CPU clones of the objects in ``tracked``
(``colabjob.jobs.state.tracked``: model tensors, with tied ones recorded as aliases instead
of stored twice; optimizer, scheduler and scaler state; the RNGs; the loader
position; extra objects' states; metrics, meta and library versions), so the loop can go on
at once (``clone=False``: references to the live tensors, for a synchronous save that needs
no extra memory). With a ``StagingPool`` (``staging=``), GPU tensors are copied into pinned
host buffers reused from one snapshot to the next (``colabjob.jobs.state.pinned``) instead
of freshly allocated memory. ``write_snapshot(snapshot, directory)`` turns it into the files of
``colabjob.jobs.state.format`` and may run on a background thread: it only reads the
snapshot's own copies, streams them tensor by tensor (``colabjob.jobs.state.tensorfile``) and, with
``consume``, frees each one once written (pooled buffers stay with their pool, which may
reuse them once the write is done). ``state.json`` is written last.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

from colabjob.errors import CheckpointError
from colabjob.jobs.state.codec import atomic_write, deep_cpu_copy, encode, write_json
from colabjob.jobs.state.format import (
    FORMAT,
    METRICS_FILE,
    MODEL_FILE,
    OPTIMIZER_TENSORS_FILE,
    STATE_FILE,
    TENSORS_FILE,
    Counters,
    Snapshot,
    Stateful,
    model_keys,
)
from colabjob.jobs.state.pinned import Staging, StagingPool
from colabjob.jobs.state.rng import capture_rng
from colabjob.jobs.state.tensorfile import write_tensors
from colabjob.jobs.state.tracked import Tracked

__all__ = ["snapshot", "write_snapshot"]


def _versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        # on a CPU the intra-op threads split every sum: another count, other last bits
        "cpu_threads": str(torch.get_num_threads()),
    }
    try:
        out["colabjob"] = importlib.metadata.version("colabjob")
    except importlib.metadata.PackageNotFoundError:
        out["colabjob"] = "unknown"
    for name in ("transformers", "peft", "accelerate", "torchdata", "datasets"):
        if name in sys.modules:
            out[name] = str(getattr(sys.modules[name], "__version__", "unknown"))
    return out


def _cpu_copy(t: torch.Tensor, key: str, staging: Staging | None) -> torch.Tensor:
    """A detached CPU copy of ``t``: into the pool's pinned buffer for ``key`` when ``t`` is
    on a GPU and a pool is lent (valid after ``staging.finish()``), else fresh memory."""
    if staging is not None and t.is_cuda:
        return staging.copy(key, t)
    return t.detach().to("cpu", copy=True)


def _staged_copy(obj: Any, key: str, staging: Staging | None) -> Any:
    """``deep_cpu_copy`` whose GPU tensors go through ``staging`` (keyed by their path)."""
    if staging is None:
        return deep_cpu_copy(obj)
    if isinstance(obj, torch.Tensor):
        return _cpu_copy(obj, key, staging)
    if isinstance(obj, dict):
        return type(obj)((k, _staged_copy(v, f"{key}/{k!r}", staging)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        items = [_staged_copy(v, f"{key}/{i}", staging) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return deep_cpu_copy(obj)


def _capture_model(
    model: torch.nn.Module, trainable_only: bool, clone: bool, staging: Staging | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU clones of the model tensors (``clone``; else the live tensors, detached); a key
    whose tensor is an exact alias of an earlier one (tied embeddings) is recorded in the
    alias map instead of stored twice."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key in model_keys(model, trainable_only):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"model state {key!r} is a {type(t).__name__}, not a tensor")
        ident = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = _cpu_copy(t, f"model/{key}", staging).contiguous() if clone else t.detach()
    return tensors, aliases


def snapshot(
    tracked: Tracked,
    *,
    counters: Counters,
    metrics: Sequence[Mapping[str, Any]] = (),
    meta: Mapping[str, Any] | None = None,
    capture_rngs: bool = True,
    clone: bool = True,
    staging: StagingPool | None = None,
) -> Snapshot:
    """Copy the state of ``tracked``'s objects to CPU memory; call it right after an
    optimizer step.

    ``tracked.trainable_only=None`` saves only trainable parameters (and buffers) when some
    parameter has ``requires_grad=False``. Raises ``CheckpointError`` mid-accumulation.
    ``clone=False`` keeps references to the live model and optimizer tensors instead of
    copies (no extra memory): only for a snapshot written at once, before training goes on.
    ``staging``: copy GPU tensors into this pool's pinned buffers (when no earlier snapshot
    still holds them); ``write_snapshot`` hands them back (``Snapshot.release``).
    """
    if not counters.at_optimizer_boundary:
        raise CheckpointError(
            f"snapshot at micro-step {counters.micro_step} of a gradient-accumulation window",
            hint="checkpoint only after optimizer.step(); accumulated gradients are not saved",
        )
    loader, extras = tracked.loader, tracked.extras
    for name in extras:
        if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise CheckpointError(f"extra state name {name!r}: use letters, digits, '_', '-', '.'")
    lease = staging.lease() if clone and staging is not None else None
    try:
        model_state, aliases, partial, opt = _capture_training(tracked, clone, lease)
        if lease is not None:
            lease.finish()  # the copies were asynchronous: done before the loop goes on
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return Snapshot(
        counters=counters,
        model=model_state,
        model_aliases=aliases,
        trainable_only=partial,
        optimizer=opt,
        rng=capture_rng() if capture_rngs else None,
        data=deep_cpu_copy(loader.state_dict()) if loader is not None else None,
        geometry=tracked.geometry,
        extras={k: deep_cpu_copy(v.state_dict()) for k, v in extras.items()},
        metrics=tuple(copy.deepcopy(dict(m)) for m in metrics),
        meta=copy.deepcopy(dict(meta or {})),
        versions=_versions(),
        live=not clone,
        release=None if lease is None else lease.release,
    )


def _capture_training(
    tracked: Tracked, clone: bool, lease: Staging | None
) -> tuple[dict[str, torch.Tensor] | None, dict[str, str], bool, dict[str, Any] | None]:
    """The model's tensors, aliases and whether only trainable ones are saved, and the
    optimizer / scheduler / scaler states: copies (``clone``) or the live objects."""
    model, trainable_only = tracked.model, tracked.trainable_only
    model_state, aliases, partial = None, dict[str, str](), False
    if model is not None:
        partial = (
            any(not p.requires_grad for p in model.parameters())
            if trainable_only is None
            else trainable_only
        )
        model_state, aliases = _capture_model(model, partial, clone, lease)
    opt = None
    if tracked.has_optimizer_state:

        def take(name: str, obj: Stateful | None) -> Any:
            if obj is None:
                return None
            return _staged_copy(obj.state_dict(), name, lease) if clone else obj.state_dict()

        opt = {key: take(key, obj) for key, obj in tracked.optimizer_parts()}
    return model_state, aliases, partial, opt


def _write_optimizer(snap: Snapshot, path: Path, consume: bool) -> Path:
    """Optimizer, scheduler and scaler state as one safetensors file: the tensors, plus the
    rest of the structure as JSON in its metadata (``encode``), so loading never unpickles."""
    assert snap.optimizer is not None
    tensors: dict[str, torch.Tensor] = {}
    tree = encode(snap.optimizer, "optimizer", tensors)
    if consume:  # the tensors mapping now holds the snapshot's only references
        snap.optimizer.clear()
    meta = {"tree": json.dumps(tree, separators=(",", ":"))}
    return atomic_write(path, lambda p: write_tensors(p, tensors, metadata=meta, consume=True))


def write_snapshot(
    snap: Snapshot, directory: str | os.PathLike[str], *, consume: bool = False
) -> dict[str, Path]:
    """Write ``snap`` as files in ``directory`` (created if needed); ``state.json`` last.

    Returns ``{file name: path}`` for the files written. Thread-safe with respect to the
    training loop: it only reads the snapshot's own copies. Tensors are written one at a
    time from where they are (no serialised copy of the whole state); with ``consume`` each
    is dropped from the snapshot once written, so its memory is freed as the files grow
    (the snapshot is empty afterwards: write it once). Its pooled buffers, if any, go back
    to their pool when it returns or raises (``Snapshot.release``).
    """
    try:
        return _write(snap, Path(directory), consume)
    finally:
        if snap.release is not None:
            snap.release()


def _write(snap: Snapshot, root: Path, consume: bool) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    model = snap.model
    model_doc = None
    if model is not None:
        model_doc = {
            "trainable_only": snap.trainable_only,
            "keys": sorted(model),
            "aliases": snap.model_aliases,
        }
        files[MODEL_FILE] = atomic_write(
            root / MODEL_FILE,
            lambda p: write_tensors(p, model, metadata={"format": "pt"}, consume=consume),
        )
    opt_parts = None
    if snap.optimizer is not None:
        opt_parts = {k: v is not None for k, v in snap.optimizer.items()}
        files[OPTIMIZER_TENSORS_FILE] = _write_optimizer(
            snap, root / OPTIMIZER_TENSORS_FILE, consume
        )
    tensors: dict[str, torch.Tensor] = {}
    doc: dict[str, Any] = {
        "format": FORMAT,
        "counters": snap.counters.to_dict(),
        "geometry": snap.geometry.to_dict() if snap.geometry else None,
        "model": model_doc,
        "optimizer": opt_parts,
        "optimizer_file": None if opt_parts is None else OPTIMIZER_TENSORS_FILE,
        "rng": None,
        "data": encode(snap.data, "data", tensors),
        "extras": {k: encode(v, f"extras/{k}", tensors) for k, v in snap.extras.items()},
        "meta": snap.meta,
        "versions": snap.versions,
    }
    if snap.rng is not None:
        doc["rng"] = snap.rng.plain()
        tensors.update({f"rng/{k}": v for k, v in snap.rng.tensors().items()})
    if snap.ranks:
        doc["world_size"] = 1 + len(snap.ranks)
        doc["ranks"] = {}
        for r, rank in enumerate(snap.ranks, start=1):
            doc["ranks"][str(r)] = {
                "rng": None if rank.rng is None else rank.rng.plain(),
                "data": encode(rank.data, f"ranks/{r}/data", tensors),
            }
            if rank.rng is not None:
                tensors.update({f"ranks/{r}/rng/{k}": v for k, v in rank.rng.tensors().items()})
    if tensors:
        files[TENSORS_FILE] = atomic_write(root / TENSORS_FILE, lambda p: write_tensors(p, tensors))
    files[METRICS_FILE] = write_json(root / METRICS_FILE, list(snap.metrics))
    files[STATE_FILE] = write_json(root / STATE_FILE, doc)
    return files
