"""The sections of the job spec that say how its sessions run rather than what is trained:
``checkpoint`` (cadence, retention, staging, the final artifact, background saves),
``budget`` (the platform, the time limit and the stop margin, with ``DEFAULT_MARGIN``, the
one default of every margin) and ``logging`` (experiment trackers). Frozen, keyword-only
dataclasses like the sections in config/schema.py; no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NoReturn

from colabjob.config._fields import (
    Section,
    duration_text,
    iso_text,
    parse_duration,
    parse_iso,
)
from colabjob.config.schema import Platform


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec(Section):
    """``checkpoint``: cadence, retention, local staging, the final artifact, and whether
    periodic checkpoints copy the state for a background save (``async``: ``auto`` does
    when the copy fits in host memory; the YAML key ``async`` is the field ``async_``)."""

    _path: ClassVar[str] = "checkpoint"
    every_steps: int | None = None
    every_minutes: float | None = 30.0
    keep: int = 2
    staging_dir: str | None = None
    final_artifact: Literal["adapter", "merged"] | None = None
    async_: bool | Literal["auto"] = "auto"

    @classmethod
    def from_mapping(cls, data: Any) -> CheckpointSpec:
        if isinstance(data, Mapping) and "async" in data:  # a Python keyword: not a field name
            data = {("async_" if k == "async" else k): v for k, v in data.items()}
        return super().from_mapping(data)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["async"] = out.pop("async_")
        return out

    def _fail(self, name: str, problem: str, *, hint: str | None = None) -> NoReturn:
        super()._fail("async" if name == "async_" else name, problem, hint=hint)

    def _check(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            self._fail("every_steps", f"must be at least 1, got {self.every_steps}", hint="or null")
        if self.every_minutes is not None and self.every_minutes <= 0:
            self._fail(
                "every_minutes", f"must be greater than 0, got {self.every_minutes}", hint="or null"
            )
        if self.keep < 2:
            self._fail(
                "keep",
                f"must be at least 2, got {self.keep}",
                hint="the newest checkpoint can be the one a crash interrupted; "
                "keeping two always leaves a valid one to resume from",
            )


#: The one default of ``budget.margin``, ``--margin`` and ``colabjob.session(margin=...)``:
#: time kept free after the final commit for estimation error (the runner parses it).
DEFAULT_MARGIN = "5m"


@dataclass(frozen=True, kw_only=True)
class BudgetSpec(Section):
    """``budget``: how long a session may run and how early to stop before its end."""

    _path: ClassVar[str] = "budget"
    _pre: ClassVar[Mapping[str, Any]] = {
        "limit": duration_text,
        "margin": duration_text,
        "session_started_at": iso_text,
    }
    platform: Platform = "auto"
    limit: str | None = None
    margin: str = DEFAULT_MARGIN
    session_started_at: str | None = None

    def _check(self) -> None:
        for name in ("limit", "margin"):
            text = getattr(self, name)
            if text is None:
                continue
            try:
                seconds = parse_duration(text)
            except ValueError:
                hint = "e.g. 11h30m, 90m, 1.5h, 45s, 1d, 11:30:00, or seconds as a bare number"
                if re.fullmatch(r"\d+(\.\d*)?", text.strip()):
                    hint = f"add a unit: {text.strip()}m for minutes, {text.strip()}s for seconds"
                self._fail(name, f"{text!r} is not a duration", hint=hint)
            if name == "limit" and seconds <= 0:
                self._fail(
                    name, f"must be longer than 0, got {text!r}", hint="or null for the platform's"
                )
        if self.session_started_at is not None:
            try:
                parse_iso(self.session_started_at)
            except ValueError:
                self._fail(
                    "session_started_at",
                    f"{self.session_started_at!r} is not an ISO 8601 time",
                    hint="e.g. 2025-01-31T09:30:00+00:00, or null to estimate it",
                )

    @property
    def limit_s(self) -> float | None:
        """``limit`` in seconds (None: the platform's own limit)."""
        return None if self.limit is None else parse_duration(self.limit)

    @property
    def margin_s(self) -> float:
        return parse_duration(self.margin)


@dataclass(frozen=True, kw_only=True)
class LoggingSpec(Section):
    """``logging``: experiment trackers fed with the metrics of every log interval."""

    _path: ClassVar[str] = "logging"
    tensorboard: bool | Literal["auto"] = "auto"
    wandb: bool = False
    wandb_project: str | None = None
