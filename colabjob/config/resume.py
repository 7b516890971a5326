"""Which spec changes a resume can take: ``config_hash`` fingerprints the fields that decide
the numbers a run produces (stamped into every checkpoint manifest), and ``diff_for_resume``
compares the snapshot in the job record with the spec a ``resume`` brings, refusing changes
that would make the resumed run differ from an uninterrupted one unless forced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from colabjob.config.jobspec import JobSpec
from colabjob.errors import ConfigError

# Fields (or whole sections) a resume may change freely: they decide when a run stops,
# saves or where it lives, not the numbers it computes. Extending max_steps/epochs also
# lengthens a linear/cosine schedule from the current step on: the run continues exactly
# from its checkpoint, it just no longer equals one started with the new length.
SAFE_TO_CHANGE: frozenset[str] = frozenset(
    {
        "job.name",
        "job.storage",
        "model.gradient_checkpointing",
        "training.max_steps",
        "training.epochs",
        "training.num_workers",
        "training.log_every_steps",
        # how the state is laid out over the processes, like --nproc (not in the spec):
        # a checkpoint loads either way (whole <-> sharded); exact only when it is unchanged
        "training.fsdp",
        "checkpoint",
        "budget",
        "logging",
    }
)


def _is_safe(path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in SAFE_TO_CHANGE)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def exactness_fields(spec: JobSpec) -> dict[str, Any]:
    """The dotted fields of ``spec`` that decide its numbers, without null/empty ones (so a
    field added later with a null default leaves old hashes unchanged)."""
    flat = _flatten(spec.to_dict())
    return {k: v for k, v in flat.items() if not _is_safe(k) and v is not None and v != {}}


def config_hash(spec: JobSpec) -> str:
    """sha256 (hex) of the canonical JSON of ``exactness_fields(spec)``: equal for specs that
    train the same numbers, whatever their key order or their safe-to-change fields."""
    payload = json.dumps(
        exactness_fields(spec),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def diff_for_resume(old: JobSpec, new: JobSpec, force: bool = False) -> list[str]:
    """The changes from ``old`` (the job's snapshot) to ``new``, one ``"path: old -> new"``
    line each. Raises ConfigError naming every field whose change would break an exact
    resume, unless ``force``; forced lines end with ``(forced: no longer exact)``. A change
    of ``job.kind`` is refused even when forced."""
    if old.job.kind != new.job.kind:
        raise ConfigError(
            f"resume cannot change job.kind ({old.job.kind!r} -> {new.job.kind!r}): "
            "its checkpoints hold a different kind of state",
            hint="start a new job for the new kind (even --force cannot resume across kinds)",
        )
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    allowed: list[str] = []
    refused: list[str] = []
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path), after.get(path)
        if a == b and type(a) is type(b):
            continue
        line = f"{path}: {a!r} -> {b!r}"
        if _is_safe(path):
            allowed.append(line)
        elif force:
            allowed.append(f"{line} (forced: no longer exact)")
        else:
            refused.append(line)
    if refused:
        names = ", ".join(line.split(":", 1)[0] for line in refused)
        raise ConfigError(
            f"resume would change {names}, which breaks an exact resume:\n    "
            + "\n    ".join(refused),
            hint="keep the job's values (see `colabjob status JOB`), or pass --force to resume "
            "anyway with a run that no longer matches an uninterrupted one",
        )
    return allowed
