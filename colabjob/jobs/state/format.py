"""The training-state checkpoint's format: its files and the records passed in and out.

A checkpoint directory holds up to five files (``FILES``), ``state.json`` (``STATE_FILE``,
tagged ``FORMAT``) written last. This module owns those names and the plain records the
capture side (``colabjob.jobs.state.capture``) and the restore side
(``colabjob.jobs.state.restore``) share: ``Counters`` (progress, advanced one micro-batch at
a time), ``Snapshot`` (everything to write, already in CPU memory) with a ``RankState`` per
extra process, ``Restored`` (what ``restore`` hands back), the ``Stateful`` protocol for
objects saved through ``state_dict()``, and ``model_keys``, the rule for which of a model's
tensors a checkpoint holds (all, or trainable parameters plus buffers).

The files: ``model.safetensors`` (weights; tied tensors stored once),
``optimizer.safetensors`` (optimizer, scheduler and scaler state: tensors, plus the rest as
JSON in its metadata; older checkpoints' ``optimizer.pt`` is read only with
``torch.load(weights_only=True)``), ``state.safetensors`` (RNG tensors and tensors from
loader/extra states), ``metrics.json`` and, last, ``state.json`` (format, counters,
geometry, RNG of Python and NumPy, loader and extra states, user meta, library versions;
for every rank but 0 of a multi-process snapshot, that rank's RNGs and loader position).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

from colabjob.jobs.data.geometry import Geometry
from colabjob.jobs.state.rng import RngState

if TYPE_CHECKING:
    from colabjob.jobs.state.dcp_writer import ShardWrite

__all__ = [
    "FILES",
    "FORMAT",
    "METRICS_FILE",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "OPTIMIZER_TENSORS_FILE",
    "STATE_FILE",
    "TENSORS_FILE",
    "Counters",
    "RankState",
    "Restored",
    "Snapshot",
    "Stateful",
    "model_keys",
]

FORMAT = "colabjob.state/1"
MODEL_FILE, OPTIMIZER_TENSORS_FILE = "model.safetensors", "optimizer.safetensors"
OPTIMIZER_FILE = "optimizer.pt"  # older checkpoints' optimizer state (read, never written)
TENSORS_FILE, METRICS_FILE, STATE_FILE = "state.safetensors", "metrics.json", "state.json"
FILES = (MODEL_FILE, OPTIMIZER_TENSORS_FILE, TENSORS_FILE, METRICS_FILE, STATE_FILE)


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
    live: bool = False  # model/optimizer tensors are the live ones: write before training on
    # An FSDP2 model's and optimizer's DCP files, being written by every rank into the
    # checkpoint prefix it names (``colabjob.jobs.state.dcp_writer``): the commit waits for
    # them and lists them under ``dcp/`` with the rest.
    shards: ShardWrite | None = None
    # Called once the snapshot's tensors are no longer read (written, or never to be): its
    # pinned staging buffers (``colabjob.jobs.state.pinned``) may serve the next snapshot.
    release: Callable[[], None] | None = field(default=None, repr=False, compare=False)

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


def model_keys(model: torch.nn.Module, trainable_only: bool) -> list[str]:
    """State-dict keys saved for ``model``: all, or trainable parameters plus buffers."""
    keys = list(model.state_dict(keep_vars=True))
    if not trainable_only:
        return keys
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return [k for k in keys if k in trainable or k in buffers]
