"""What a Session tracks: the live objects, checked once, and the size of each batch.

``SessionTracked`` holds the objects ``Session.track()`` registers (the checkpoint's slots,
``colabjob.jobs.state.tracked.Tracked``, plus the Session's ``optional`` extras);
``build_tracked()`` checks them the way ``track()`` documents (a loader that can report
its position, a positive ``grad_accum``, a known batch size, no object both in ``extras``
and ``optional``, a loader built for the process group's geometry) and says what to do
when one is wrong. ``batch_len()`` counts the samples in a batch for the Session's
``step()``, on its hot path: type checks first, ``isinstance`` only for the rare mappings.
``release_loader()`` stops a multi-worker loader's processes when the segment closes.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from colabjob.errors import ConfigError
from colabjob.jobs.data import Geometry
from colabjob.jobs.distributed import check_loader, unwrap_model
from colabjob.jobs.state.format import Stateful
from colabjob.jobs.state.sharded import is_sharded
from colabjob.jobs.state.tracked import Tracked

__all__ = ["SessionTracked", "batch_len", "build_tracked", "release_loader"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SessionTracked(Tracked):
    """The live objects of a session (set once by ``Session.track``): the checkpoint's
    slots (``colabjob.jobs.state.tracked.Tracked``), and ``optional`` extras, left out of
    an emergency checkpoint and kept fresh when a checkpoint lacks them."""

    optional: Mapping[str, Stateful] = field(default_factory=dict)

    def saved(self, *, emergency: bool = False) -> Tracked:
        """The objects a checkpoint saves: the extras and, unless ``emergency``, the
        optional ones."""
        return self.loaded(() if emergency else self.optional)

    def loaded(self, present: Iterable[str]) -> Tracked:
        """The objects to load from a checkpoint holding the extras named in ``present``:
        the extras, and the optional ones it holds."""
        names = set(present)
        optional = {k: v for k, v in self.optional.items() if k in names}
        return replace(self, extras={**self.extras, **optional}, optional={})


def build_tracked(
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Stateful | None,
    scaler: Stateful | None,
    loader: Any,
    grad_accum: int,
    batch_size: int | None,
    world_size: int,
    distributed: bool,
    extras: Mapping[str, Stateful] | None,
    optional: Mapping[str, Stateful] | None,
    trainable_only: bool | None,
    require_sharded: bool = False,
) -> SessionTracked:
    """``track()``'s arguments, checked; a ``DistributedDataParallel`` model unwrapped (so
    its state-dict keys carry no ``module.`` prefix). ``require_sharded`` (the job's
    ``training.fsdp``, several processes): the model must be FSDP2-sharded."""
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ConfigError(f"grad_accum must be a positive int, got {grad_accum!r}")
    if loader is not None and not (
        callable(getattr(loader, "state_dict", None))
        and callable(getattr(loader, "load_state_dict", None))
    ):
        raise ConfigError(
            f"the loader ({type(loader).__name__}) cannot report its position",
            hint="build it with colabjob.jobs.data.make_loader(dataset, batch_size=..., "
            "seed=...), which resumes at the exact sample",
        )
    both = set(extras or {}) & set(optional or {})
    if both:
        raise ConfigError(f"{sorted(both)} passed both as extras and as optional")
    size = batch_size if batch_size is not None else getattr(loader, "batch_size", None)
    if loader is not None and size is None:
        raise ConfigError("cannot tell the loader's batch size; pass track(batch_size=...)")
    if distributed:
        check_loader(loader, grad_accum=grad_accum, world_size=world_size)
    if require_sharded and model is not None and not is_sharded(model):
        raise ConfigError(
            "training.fsdp is on, but the model passed to track() is not sharded",
            hint="shard it before building the optimizer: "
            "model = colabjob.jobs.sharding.shard_model(model) (or fully_shard), or "
            "drop training.fsdp / --fsdp",
        )
    geometry = None
    if size is not None:
        geometry = Geometry(batch_size=size, grad_accum=grad_accum, world_size=world_size)
    return SessionTracked(
        model=unwrap_model(model),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loader=loader,
        extras=dict(extras or {}),
        optional=dict(optional or {}),
        trainable_only=trainable_only,
        geometry=geometry,
    )


def batch_len(batch: Any, default: int) -> int:
    """Samples in ``batch``: the first dimension of its first tensor (a mapping's first
    value, a sequence's first item), a sequence's length, else ``default``."""
    b = batch
    kind = type(b)
    if kind is dict or (kind is not list and kind is not tuple and isinstance(b, Mapping)):
        b = next(iter(b.values()), None)
    elif (kind is list or kind is tuple) and b and isinstance(b[0], torch.Tensor):
        b = b[0]
    if isinstance(b, torch.Tensor):
        return int(b.shape[0]) if b.dim() else 1
    if type(b) is list or type(b) is tuple:
        return len(b)
    return default


def release_loader(loader: Any, batches: Generator[Any, None, None] | None) -> None:
    """Stop the loader's worker processes now. The loader keeps its last iterator (for
    ``state_dict()``); left to the garbage collector, torch's shutdown of a suspended
    multi-worker iterator waits out a 5 s join per worker, wherever the collection runs."""
    shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
    try:
        if batches is not None:
            batches.close()
        if callable(shutdown):
            shutdown()
    except Exception as e:  # cleanup only: never mask the segment's outcome
        log.debug("releasing the loader failed: %s", e)
