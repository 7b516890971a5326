"""The job record: ``job.json`` at the job's storage root, the job's memory across sessions.

It holds the state (see ``states``), the config snapshot that ``resume`` needs without flags,
its hash, the fencing epoch of the newest lease, a history of segments (who ran which steps
where, and why each stopped) and free-form extras (e.g. a W&B run id). Records are frozen;
every change is a pure function ``JobRecord -> JobRecord`` applied by ``update_record``,
which re-reads and retries when a compare-and-swap loses a race, so two writers never
silently overwrite each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import JobStateError, ObjectNotFoundError, PreconditionFailedError
from colabjob.jobs.policy import StopReason
from colabjob.runner.states import (
    JobEvent,
    JobState,
    LeaseStatus,
    transition,
)

if TYPE_CHECKING:
    from colabjob.storage.store import Store, Version

RECORD_KEY = "job.json"
SCHEMA = 1


@dataclass(frozen=True, kw_only=True)
class Segment:
    """One session's stretch of a job: from ``first_step`` to ``last_step`` and why it ended."""

    session_id: str
    platform: str
    host: str
    started_at: float
    first_step: int = 0
    epoch: int = 0
    ended_at: float | None = None
    last_step: int | None = None
    stop_reason: StopReason | None = None
    error: str | None = None
    checkpoint_step: int | None = None  # the newest step this segment saw committed
    from_scratch: bool = False  # started over at step 0 on purpose (`resume --from-scratch`)

    def __post_init__(self) -> None:
        if not self.session_id:
            raise ValueError("Segment.session_id must not be empty")
        if self.first_step < 0:
            raise ValueError(f"Segment.first_step must be >= 0, got {self.first_step}")
        if self.stop_reason is not None and not isinstance(self.stop_reason, StopReason):
            object.__setattr__(self, "stop_reason", StopReason(self.stop_reason))

    @property
    def open(self) -> bool:
        return self.ended_at is None and self.stop_reason is None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop_reason"] = self.stop_reason.value if self.stop_reason else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Segment:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """The content of ``job.json``. Change it with the ``with_*``/``apply`` methods."""

    job_id: str
    state: JobState = JobState.CREATED
    config: Mapping[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    epoch: int = 0
    history: tuple[Segment, ...] = ()
    created_at: float = 0.0
    updated_at: float = 0.0
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("JobRecord.job_id must not be empty")
        object.__setattr__(self, "state", JobState(self.state))
        object.__setattr__(self, "history", tuple(self.history))
        if not isinstance(self.epoch, int) or self.epoch < 0:
            raise ValueError(f"JobRecord.epoch must be an int >= 0, got {self.epoch!r}")
        if not self.config_hash:
            object.__setattr__(self, "config_hash", config_hash(self.config))

    # -- derived -------------------------------------------------------------------------
    @property
    def current_segment(self) -> Segment | None:
        """The last segment if it has not ended yet."""
        return self.history[-1] if self.history and self.history[-1].open else None

    @property
    def last_step(self) -> int | None:
        """The newest step any segment reported (None before the first one ended)."""
        steps = [s.last_step for s in self.history if s.last_step is not None]
        return max(steps) if steps else None

    @property
    def committed_step(self) -> int:
        """The newest step a segment saw committed since the last deliberate start over
        (0 if none): with no valid checkpoint left, resuming must not silently retrain."""
        steps: list[int] = []
        for seg in self.history:
            if seg.from_scratch:
                steps = []
            if seg.checkpoint_step is not None:
                steps.append(seg.checkpoint_step)
        return max(steps, default=0)

    # -- changes (pure) ------------------------------------------------------------------
    def apply(self, event: JobEvent) -> JobRecord:
        """This record moved by ``event``; ``InvalidTransitionError`` if not allowed."""
        return dataclasses.replace(self, state=transition(self.state, event))

    def with_epoch(self, epoch: int) -> JobRecord:
        """Raise the fencing epoch (never lowers it)."""
        return dataclasses.replace(self, epoch=max(self.epoch, int(epoch)))

    def with_extras(self, **extras: Any) -> JobRecord:
        return dataclasses.replace(self, extras={**self.extras, **extras})

    def begin_segment(self, segment: Segment) -> JobRecord:
        """Append ``segment``. A segment left open (its VM vanished) is closed as a crash."""
        history = list(self.history)
        if history and history[-1].open:
            history[-1] = dataclasses.replace(
                history[-1],
                stop_reason=StopReason.CRASH,
                error=history[-1].error or "segment ended without a clean stop (runner lost)",
            )
        history.append(segment)
        return dataclasses.replace(
            self, history=tuple(history), epoch=max(self.epoch, segment.epoch)
        )

    def end_segment(
        self,
        *,
        ended_at: float,
        last_step: int | None,
        stop_reason: StopReason,
        error: str | None = None,
        checkpoint_step: int | None = None,
    ) -> JobRecord:
        """Close the open segment; ``JobStateError`` if none is open."""
        seg = self.current_segment
        if seg is None:
            raise JobStateError(f"job {self.job_id} has no open segment to end")
        closed = dataclasses.replace(
            seg,
            ended_at=ended_at,
            last_step=last_step,
            stop_reason=StopReason(stop_reason),
            error=error,
            checkpoint_step=seg.checkpoint_step if checkpoint_step is None else checkpoint_step,
        )
        return dataclasses.replace(self, history=(*self.history[:-1], closed))

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "job_id": self.job_id,
            "state": self.state.value,
            "config": dict(self.config),
            "config_hash": self.config_hash,
            "epoch": self.epoch,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "history": [s.to_dict() for s in self.history],
            "extras": dict(self.extras),
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n").encode()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobRecord:
        if int(d.get("schema", SCHEMA)) > SCHEMA:
            raise JobStateError(
                f"job.json has schema {d['schema']}; this colabjob reads up to {SCHEMA}",
                hint="upgrade colabjob on this machine",
            )
        return cls(
            job_id=d["job_id"],
            state=JobState(d["state"]),
            config=d.get("config") or {},
            config_hash=d.get("config_hash") or "",
            epoch=int(d.get("epoch", 0)),
            history=tuple(Segment.from_dict(s) for s in d.get("history") or ()),
            created_at=float(d.get("created_at", 0.0)),
            updated_at=float(d.get("updated_at", 0.0)),
            extras=d.get("extras") or {},
        )

    @classmethod
    def from_json(cls, data: bytes, *, where: str = RECORD_KEY) -> JobRecord:
        try:
            return cls.from_dict(json.loads(data))
        except (ValueError, KeyError, TypeError) as e:
            raise JobStateError(
                f"{where} is not a valid job record: {e}",
                hint="rebuild it from the newest valid checkpoint: colabjob repair JOB_URL "
                "(checkpoints are untouched)",
            ) from e


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable hash of a config snapshot (key order does not matter)."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def effective_state(record: JobRecord, lease_status: LeaseStatus) -> JobState:
    """The state to act on: RUNNING without a live runner behind it counts as SUSPENDED."""
    gone = {LeaseStatus.EXPIRED, LeaseStatus.RELEASED, LeaseStatus.ABSENT}
    if record.state is JobState.RUNNING and LeaseStatus(lease_status) in gone:
        return JobState.SUSPENDED
    return record.state


# -- storage -----------------------------------------------------------------------------
def read_record(store: Store) -> tuple[JobRecord, Version] | None:
    """``(record, version)`` or None when the job has no record."""
    got = store.read_versioned(RECORD_KEY)
    if got is None:
        return None
    data, version = got
    return JobRecord.from_json(data, where=_where(store)), version


def load_record(store: Store) -> JobRecord:
    """The job's record; ``ObjectNotFoundError`` saying so if there is no job there."""
    got = read_record(store)
    if got is None:
        raise _no_job(store)
    return got[0]


def create_record(
    store: Store,
    *,
    job_id: str,
    config: Mapping[str, Any],
    extras: Mapping[str, Any] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> JobRecord:
    """Write a new CREATED record, create-only (``AlreadyExistsError`` if one exists)."""
    now = clock.time()
    record = JobRecord(
        job_id=job_id,
        config=dict(config),
        created_at=now,
        updated_at=now,
        extras=dict(extras or {}),
    )
    store.create(RECORD_KEY, record.to_json())
    return record


def update_record(
    store: Store,
    change: Callable[[JobRecord], JobRecord],
    *,
    attempts: int = 10,
    backoff: float = 0.05,
    clock: Clock = SYSTEM_CLOCK,
) -> JobRecord:
    """Read, ``change`` (a pure function; may run more than once), compare-and-swap, retry.

    Returns the record as written. After ``attempts`` lost races raises
    ``PreconditionFailedError``; whatever ``change`` raises (e.g. ``InvalidTransitionError``)
    propagates at once.
    """
    last: PreconditionFailedError | None = None
    for attempt in range(max(1, attempts)):
        got = read_record(store)
        if got is None:
            raise _no_job(store)
        current, version = got
        new = change(current)
        if new == current:
            return current
        new = dataclasses.replace(new, updated_at=clock.time())
        try:
            store.replace(RECORD_KEY, new.to_json(), version)
            return new
        except PreconditionFailedError as e:
            last = e
            clock.sleep(backoff * (attempt + 1) * (0.5 + random.random()))
    raise PreconditionFailedError(
        f"{_where(store)} kept changing under us ({attempts} attempts)",
        hint="another process is updating this job in a loop; stop it and retry",
    ) from last


def _no_job(store: Store) -> ObjectNotFoundError:
    return ObjectNotFoundError(
        f"no job at {store.url}: {RECORD_KEY} is missing",
        hint="check the job URL (`colabjob ls` lists jobs), or create it with `colabjob start`",
    )


def _where(store: Store) -> str:
    return f"{str(getattr(store, 'url', '')).rstrip('/')}/{RECORD_KEY}"


# -- jobs made by a script ---------------------------------------------------------------
SCRIPT_KEY = "script"  # the record config of a job a script made (``colabjob.hf.resumable``)


def script_config(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """What a script job's record says about it (``kind``, ``training_args``, ...), or None
    for a job from a spec or ``colabjob.session()``. Records written before the ``script``
    key had ``job.kind`` ``hf-trainer`` next to a top-level ``trainer``."""
    script = config.get(SCRIPT_KEY)
    if isinstance(script, Mapping):
        return script
    job = config.get("job")
    if isinstance(job, Mapping) and job.get("kind") == "hf-trainer" and "trainer" in config:
        return {**config, "kind": "hf-trainer"}
    return None
