"""The tracked-state object: every live object a checkpoint saves, each under one key.

``Tracked`` is what ``colabjob.jobs.state.capture.snapshot`` copies and
``colabjob.jobs.state.restore.restore`` loads into: the model, optimizer, scheduler, grad
scaler, data loader, batch geometry and named extra ``Stateful`` objects. Every training path
builds one (the Session through ``colabjob.jobs.tracking.build_tracked``, the HF Trainer
mixin from its own attributes), so a new slot is one field here plus its save/load code,
not an edit in every signature. The key constants (``MODEL`` ... ``EXTRAS``) name the slots;
``SLOTS`` is derived from the dataclass's fields, never copied by hand. The optimizer,
scheduler and scaler keys are also the keys of the checkpoint's optimizer state (the file
format, ``colabjob.jobs.state.format``): they must never change.

Torch is imported only for type checking: building a ``Tracked`` costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from colabjob.jobs.data.geometry import Geometry
    from colabjob.jobs.state.format import Stateful

__all__ = [
    "EXTRAS",
    "GEOMETRY",
    "LOADER",
    "MODEL",
    "OPTIMIZER",
    "SCALER",
    "SCHEDULER",
    "SLOTS",
    "Tracked",
]

MODEL, OPTIMIZER, SCHEDULER, SCALER = "model", "optimizer", "scheduler", "scaler"
LOADER, GEOMETRY, EXTRAS = "loader", "geometry", "extras"

_SLOT = {"slot": True}  # field metadata: a tracked object (not an option of one)


@dataclass(frozen=True, kw_only=True)
class Tracked:
    """The live objects a checkpoint saves; ``None`` (or no extras): not saved/loaded.

    ``loader`` is any object with ``state_dict()``/``load_state_dict()`` (its position);
    ``geometry`` the batch geometry a resume must match; ``extras`` other named
    ``Stateful`` objects. ``trainable_only`` is an option of the model slot: ``None``
    saves only trainable parameters (and buffers) when some parameter is frozen.
    """

    model: torch.nn.Module | None = field(default=None, metadata=_SLOT)
    optimizer: torch.optim.Optimizer | None = field(default=None, metadata=_SLOT)
    scheduler: Stateful | None = field(default=None, metadata=_SLOT)
    scaler: Stateful | None = field(default=None, metadata=_SLOT)
    loader: Any = field(default=None, metadata=_SLOT)
    geometry: Geometry | None = field(default=None, metadata=_SLOT)
    extras: Mapping[str, Stateful] = field(default_factory=dict, metadata=_SLOT)
    trainable_only: bool | None = None

    def optimizer_parts(self) -> Iterator[tuple[str, Stateful | None]]:
        """``(key, object)`` for the parts of the checkpoint's optimizer state, in the
        order they are written (the optimizer, scheduler and scaler slots)."""
        yield OPTIMIZER, self.optimizer
        yield SCHEDULER, self.scheduler
        yield SCALER, self.scaler

    @property
    def has_optimizer_state(self) -> bool:
        """Whether any part of the optimizer state is tracked."""
        return any(obj is not None for _, obj in self.optimizer_parts())


SLOTS: tuple[str, ...] = tuple(f.name for f in fields(Tracked) if f.metadata.get("slot"))
