"""Rebuilding a lost or corrupt ``job.json`` from the job's newest valid checkpoint.

Every manifest carries the job's id and spec (``meta["job"]``, written by the
``CheckpointStore`` the runner opens), its step, the lease epoch that wrote it and when.
``repair_record`` turns the newest checkpoint that verifies into a SUSPENDED record with the
spec snapshot, its config hash, the fencing epoch and one history entry saying the record
was rebuilt at that step (so ``resume`` knows progress was committed). It never overwrites
a valid ``job.json`` unless forced, and a corrupt one is copied to ``job.json.corrupt-<time>``
first: nothing is lost. A checkpoint written before manifests carried the spec cannot
rebuild a record: ``JobStateError`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import ConfigError, JobStateError, NoCheckpointError
from colabjob.jobs.policy import StopReason
from colabjob.runner.record import RECORD_KEY, JobRecord, Segment
from colabjob.runner.states import JobState
from colabjob.storage.checkpoints import JOB_META, CheckpointStore

if TYPE_CHECKING:
    from colabjob.storage.store import Store

__all__ = ["Repair", "repair_record"]


@dataclass(frozen=True, kw_only=True)
class Repair:
    """What ``repair_record`` did."""

    record: JobRecord
    step: int
    checkpoint: str
    replaced: str | None  # why the old job.json was replaced (None: there was none)
    backup: str | None  # where the old bytes were kept


def _old_record(store: Store, *, force: bool) -> tuple[str | None, bytes | None]:
    """Why the current job.json may be replaced, and its bytes; refuses a valid one."""
    try:
        data = store.read_bytes(RECORD_KEY)
    except FileNotFoundError:
        return None, None
    try:
        JobRecord.from_json(data)
    except JobStateError as e:
        return f"it was not valid ({str(e.args[0])[:120]})", data
    if not force:
        raise ConfigError(
            f"{store.url}/{RECORD_KEY} is a valid job record; nothing to repair",
            hint="pass --force to rebuild it from the newest checkpoint anyway "
            "(the current one is kept as job.json.replaced-<time>)",
        )
    return "--force", data


def repair_record(store: Store, *, force: bool = False, clock: Clock = SYSTEM_CLOCK) -> Repair:
    """Rebuild ``job.json`` from the newest valid checkpoint (see the module docstring)."""
    replaced, old = _old_record(store, force=force)
    info = CheckpointStore(store).latest()
    if info is None:
        raise NoCheckpointError(
            f"no valid checkpoint in {store.url} to rebuild {RECORD_KEY} from",
            hint="without a checkpoint the job cannot be recovered; start it again with "
            "`colabjob start SPEC --storage URL`",
        )
    job = info.meta.get(JOB_META)
    if not isinstance(job, dict) or not isinstance(job.get("config"), dict):
        raise JobStateError(
            f"checkpoint step {info.step} ({info.dirname}) does not carry the job's spec "
            "(written by an older colabjob), so job.json cannot be rebuilt from it",
            hint="restore job.json from a backup, or start a new job from the spec and "
            "copy this job's ckpt/ into it",
        )
    now = clock.time()
    segment = Segment(
        session_id="repair",
        platform="repair",
        host="-",
        started_at=info.created_at,
        first_step=info.step,
        epoch=info.epoch,
        ended_at=info.created_at,
        last_step=info.step,
        stop_reason=StopReason.CRASH,
        error=f"job.json rebuilt by `colabjob repair` from checkpoint step {info.step}",
        checkpoint_step=info.step,
    )
    record = JobRecord(
        job_id=str(job.get("job_id") or store.url.rstrip("/").rsplit("/", 1)[-1] or "job"),
        state=JobState.SUSPENDED,
        config=job["config"],
        config_hash=str(job.get("config_hash") or ""),
        epoch=info.epoch,
        history=(segment,),
        created_at=info.created_at,
        updated_at=now,
    )
    backup = None
    if old is not None:
        kind = "replaced" if replaced == "--force" else "corrupt"
        backup = f"{RECORD_KEY}.{kind}-{int(now)}"
        store.write_bytes(backup, old)  # the old bytes stay, next to the new record
        store.write_bytes(RECORD_KEY, record.to_json())
    else:
        store.create(RECORD_KEY, record.to_json())
    return Repair(
        record=record, step=info.step, checkpoint=info.dirname, replaced=replaced, backup=backup
    )
