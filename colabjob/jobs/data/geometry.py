"""Batch geometry: the batch shape a data position was produced with, and the resume check.

A data position is counted in samples, so it stays meaningful across batch shapes; what
changes with the shape is how many samples one optimizer step consumes. ``Geometry``
records ``batch_size``, ``grad_accum`` and ``world_size`` next to every saved position, and
``check_geometry`` compares a checkpoint's geometry with the resuming run's: a change is
refused (``GeometryChangedError``, with a hint that names ``--allow-geometry-change`` and,
for a new process count, a per-rank batch that keeps the global sample order where one
exists) unless the caller allows it, in which case it warns and says what the change does
to the run.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

from colabjob.errors import ConfigError, GeometryChangedError

__all__ = ["Geometry", "check_geometry"]

ALLOW_FLAG = "--allow-geometry-change"


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """The batch shape a data position was produced with.

    ``batch_size`` is the per-rank micro-batch; one optimizer step consumes
    ``samples_per_step = batch_size * grad_accum * world_size`` samples.
    """

    batch_size: int
    grad_accum: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Geometry.{f.name} must be a positive int, got {value!r}")

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(**{f.name: int(data[f.name]) for f in fields(cls) if f.name in data})


def check_geometry(saved: Geometry, current: Geometry, *, allow_change: bool) -> tuple[str, ...]:
    """Compare the checkpoint's geometry with this run's; return the changed field names.

    A change is refused with ``GeometryChangedError`` unless ``allow_change``. When allowed
    the data position (in samples) stays valid: the run continues with the next unseen
    sample, but a step now consumes a different number of samples, so the step-based LR
    schedule and step counts no longer line up with samples as in the original plan. A
    ``world_size`` change that keeps ``samples_per_step`` (a resume on another number of
    processes with the per-rank batch adapted) continues the exact global sample order; it
    still needs ``allow_change``, because the numbers then differ in floating point.
    """
    changed = tuple(
        f.name for f in fields(Geometry) if getattr(saved, f.name) != getattr(current, f.name)
    )
    if not changed:
        return ()
    detail = ", ".join(f"{n} {getattr(saved, n)} -> {getattr(current, n)}" for n in changed)
    same_step = saved.samples_per_step == current.samples_per_step
    if not allow_change:
        hint = (
            f"restore the original values, or pass {ALLOW_FLAG} to continue from the same "
            "sample position with the new geometry (the result is then not bit-identical)"
        )
        per_rank, rest = divmod(saved.samples_per_step, current.world_size)
        if "world_size" in changed and same_step:
            hint = (
                f"the global batch is unchanged, so the sample order continues exactly; pass "
                f"{ALLOW_FLAG} to accept that another process count changes the numbers in "
                "floating point (the gradient reduction order), so the result is not "
                "bit-identical"
            )
        elif "world_size" in changed and not rest:
            hint = (
                f"to keep the sample order on {current.world_size} process(es), choose "
                f"batch_size * grad_accum = {per_rank} ({saved.samples_per_step} samples per "
                f"step) and pass {ALLOW_FLAG}; or {hint}"
            )
        raise GeometryChangedError(
            f"batch geometry changed since the checkpoint: {detail} "
            f"(samples per optimizer step {saved.samples_per_step} -> {current.samples_per_step})",
            hint=hint,
        )
    effect = (
        "the global sample order continues exactly; numbers differ in floating point only"
        if same_step
        else "the sample order continues, but a step now consumes "
        f"{current.samples_per_step} samples instead of {saved.samples_per_step}"
    )
    warnings.warn(
        f"continuing with a changed batch geometry: {detail} ({effect})", UserWarning, stacklevel=2
    )
    return changed
