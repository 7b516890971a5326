"""Exact training state: copy to CPU memory, write to plain files, restore bit-identically.

Two phases keep the training loop's pause short. ``snapshot(...)`` runs on the training
thread at an optimizer-step boundary and copies everything needed to continue *exactly*
into CPU memory (detached clones): model weights (only trainable tensors plus buffers when
part of the model is frozen, e.g. LoRA), optimizer, LR scheduler, AMP grad scaler, the
global RNGs, the data loader position and its batch ``Geometry``, ``Counters``, a metrics
history and any extra object with ``state_dict()`` / ``load_state_dict()``.
``write_snapshot(snapshot, directory)`` writes files and may run on a background thread.
``restore(directory, ...)`` validates and reads every file first, then loads the objects
and sets the RNGs last. No storage layer here: the session layer uploads the directory.

Files (``FILES``): ``model.safetensors`` (weights; tied tensors stored once),
``optimizer.pt`` (optimizer, scheduler and scaler state; read only with
``torch.load(weights_only=True)``, so a planted pickle raises ``UnsafeCheckpointError``),
``state.safetensors`` (RNG tensors and tensors from loader/extra states),
``metrics.json`` and, written last, ``state.json`` (format, counters, geometry, RNG of
Python and NumPy, loader and extra states, user meta, library versions). A multi-process
snapshot adds, for every rank but 0, that rank's RNGs and loader position (``ranks``;
rank 0's are the top-level ones, so a single process reads it like any other).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import platform
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import safetensors
import torch
from safetensors.torch import save_file

from colabjob.errors import CheckpointError, CorruptCheckpointError, ResumeError
from colabjob.jobs.data import Geometry, check_geometry
from colabjob.jobs.formats import (
    atomic_write,
    decode,
    deep_cpu_copy,
    encode,
    read_json,
    read_tensors,
    safe_torch_load,
    write_json,
)
from colabjob.jobs.rng import RngState, capture_rng, restore_rng

__all__ = [
    "FILES",
    "Counters",
    "RankState",
    "Restored",
    "Snapshot",
    "Stateful",
    "restore",
    "safe_torch_load",
    "snapshot",
    "write_snapshot",
]

FORMAT = "colabjob.state/1"
MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.pt"
TENSORS_FILE, METRICS_FILE, STATE_FILE = "state.safetensors", "metrics.json", "state.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, TENSORS_FILE, METRICS_FILE, STATE_FILE)


class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()`` (schedulers, scalers, ...)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class Counters:
    """Progress counters. ``step`` counts optimizer steps; ``micro_step`` counts micro-batches
    since the last one, so a checkpoint is only taken where ``at_optimizer_boundary``."""

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Counters.{name} must be a non-negative int, got {value!r}")

    @property
    def at_optimizer_boundary(self) -> bool:
        return self.micro_step == 0

    def after_micro_batch(self, *, samples: int, tokens: int = 0, grad_accum: int = 1) -> Counters:
        """Counters after one micro-batch; the ``grad_accum``-th one completes a step."""
        micro = self.micro_step + 1
        done = micro >= grad_accum
        return replace(
            self,
            step=self.step + int(done),
            micro_step=0 if done else micro,
            samples_seen=self.samples_seen + samples,
            tokens_seen=self.tokens_seen + tokens,
        )

    def with_epoch(self, epoch: int) -> Counters:
        return replace(self, epoch=epoch)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Counters:
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True, kw_only=True)
class RankState:
    """What differs between the processes of a multi-process run: RNGs and data position."""

    rng: RngState | None = None
    data: Any = None


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Everything ``write_snapshot`` writes, already copied to CPU memory (no live tensors)."""

    counters: Counters
    model: dict[str, torch.Tensor] | None = None
    model_aliases: dict[str, str] = field(default_factory=dict)
    trainable_only: bool = False
    optimizer: dict[str, Any] | None = None  # {"optimizer", "scheduler", "scaler"} state dicts
    rng: RngState | None = None
    data: Any = None
    geometry: Geometry | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[dict[str, Any], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    ranks: tuple[RankState, ...] = ()  # ranks 1.. of a multi-process run (rank 0 is above)

    @property
    def model_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.model or {}).values())


@dataclass(frozen=True, kw_only=True)
class Restored:
    """What ``restore`` hands back besides the objects it loaded in place."""

    counters: Counters
    metrics: list[dict[str, Any]]
    geometry: Geometry | None
    geometry_changed: tuple[str, ...]
    meta: dict[str, Any]
    versions: dict[str, str]
    world_size: int = 1  # processes that wrote the checkpoint
    rng_found: bool = True  # False: the checkpoint holds no RNG state for this rank


def _versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
    try:
        out["colabjob"] = importlib.metadata.version("colabjob")
    except importlib.metadata.PackageNotFoundError:
        out["colabjob"] = "unknown"
    for name in ("transformers", "peft", "accelerate", "torchdata", "datasets"):
        if name in sys.modules:
            out[name] = str(getattr(sys.modules[name], "__version__", "unknown"))
    return out


def _expected_keys(model: torch.nn.Module, trainable_only: bool) -> list[str]:
    """State-dict keys saved for ``model``: all, or trainable parameters plus buffers."""
    keys = list(model.state_dict(keep_vars=True))
    if not trainable_only:
        return keys
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return [k for k in keys if k in trainable or k in buffers]


def _capture_model(
    model: torch.nn.Module, trainable_only: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU clones of the model tensors; a key whose tensor is an exact alias of an earlier
    one (tied embeddings) is recorded in the alias map instead of stored twice."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key in _expected_keys(model, trainable_only):
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
        tensors[key] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def snapshot(
    *,
    counters: Counters,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    loader: Stateful | None = None,
    geometry: Geometry | None = None,
    extras: Mapping[str, Stateful] | None = None,
    metrics: Sequence[Mapping[str, Any]] = (),
    meta: Mapping[str, Any] | None = None,
    trainable_only: bool | None = None,
    capture_rngs: bool = True,
) -> Snapshot:
    """Copy the training state to CPU memory; call it right after an optimizer step.

    ``trainable_only=None`` saves only trainable parameters (and buffers) when some
    parameter has ``requires_grad=False``. Raises ``CheckpointError`` mid-accumulation.
    """
    if not counters.at_optimizer_boundary:
        raise CheckpointError(
            f"snapshot at micro-step {counters.micro_step} of a gradient-accumulation window",
            hint="checkpoint only after optimizer.step(); accumulated gradients are not saved",
        )
    for name in extras or {}:
        if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise CheckpointError(f"extra state name {name!r}: use letters, digits, '_', '-', '.'")
    model_state, aliases, partial = None, dict[str, str](), False
    if model is not None:
        partial = (
            any(not p.requires_grad for p in model.parameters())
            if trainable_only is None
            else trainable_only
        )
        model_state, aliases = _capture_model(model, partial)
    opt = None
    if optimizer is not None or scheduler is not None or scaler is not None:
        opt = {
            "optimizer": deep_cpu_copy(optimizer.state_dict()) if optimizer is not None else None,
            "scheduler": deep_cpu_copy(scheduler.state_dict()) if scheduler is not None else None,
            "scaler": deep_cpu_copy(scaler.state_dict()) if scaler is not None else None,
        }
    return Snapshot(
        counters=counters,
        model=model_state,
        model_aliases=aliases,
        trainable_only=partial,
        optimizer=opt,
        rng=capture_rng() if capture_rngs else None,
        data=deep_cpu_copy(loader.state_dict()) if loader is not None else None,
        geometry=geometry,
        extras={k: deep_cpu_copy(v.state_dict()) for k, v in (extras or {}).items()},
        metrics=tuple(copy.deepcopy(dict(m)) for m in metrics),
        meta=copy.deepcopy(dict(meta or {})),
        versions=_versions(),
    )


def write_snapshot(snap: Snapshot, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``snap`` as files in ``directory`` (created if needed); ``state.json`` last.

    Returns ``{file name: path}`` for the files written. Thread-safe with respect to the
    training loop: it only reads the snapshot's own copies.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    model = snap.model
    if model is not None:
        files[MODEL_FILE] = atomic_write(
            root / MODEL_FILE, lambda p: save_file(model, p, metadata={"format": "pt"})
        )
    if snap.optimizer is not None:
        opt = snap.optimizer
        files[OPTIMIZER_FILE] = atomic_write(root / OPTIMIZER_FILE, lambda p: torch.save(opt, p))
    tensors: dict[str, torch.Tensor] = {}
    doc: dict[str, Any] = {
        "format": FORMAT,
        "counters": snap.counters.to_dict(),
        "geometry": snap.geometry.to_dict() if snap.geometry else None,
        "model": None
        if model is None
        else {
            "trainable_only": snap.trainable_only,
            "keys": sorted(model),
            "aliases": snap.model_aliases,
        },
        "optimizer": None
        if snap.optimizer is None
        else {k: v is not None for k, v in snap.optimizer.items()},
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
        files[TENSORS_FILE] = atomic_write(root / TENSORS_FILE, lambda p: save_file(tensors, p))
    files[METRICS_FILE] = write_json(root / METRICS_FILE, list(snap.metrics))
    files[STATE_FILE] = write_json(root / STATE_FILE, doc)
    return files


def _load_model(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], info: Mapping[str, Any]
) -> None:
    full = dict(tensors)
    for alias, key in info["aliases"].items():
        full[alias] = tensors[key]
    trainable_only = bool(info["trainable_only"])
    missing = [k for k in _expected_keys(model, trainable_only) if k not in full]
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
