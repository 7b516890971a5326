"""One job at a glance, from its storage alone: what ``status`` and ``ls`` print.

State (RUNNING without a live lease shows as SUSPENDED), step and total, the newest
committed checkpoint and its age (and, from a live runner's heartbeat, whether it saves
synchronously for lack of host memory), the segments so far (and how many crashed), who holds
the lease, and an ETA: wall-clock time from the job's own pace (steps per second over its
segments, start-up included) and the number of sessions of the platform it runs on. Reads
``job.json``, the lease, the checkpoint directory names and one manifest — a handful of
small reads, no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from colabjob.config.run_sections import DEFAULT_MARGIN
from colabjob.errors import ColabJobError, CorruptCheckpointError, ObjectNotFoundError
from colabjob.jobs.policy import StopReason
from colabjob.runner.lease.info import LeaseObserver
from colabjob.runner.platforms import PRESETS, describe_platform
from colabjob.runner.record import JobRecord, effective_state, script_config
from colabjob.runner.states import JobState, LeaseStatus
from colabjob.runner.stop_request import read_stop_request
from colabjob.storage.manifest import CKPT_DIR, MANIFEST, Manifest, parse_dir

if TYPE_CHECKING:
    from colabjob.storage.store import Store


@dataclass(frozen=True, kw_only=True)
class JobSummary:
    url: str
    job_id: str
    kind: str | None
    state: str
    recorded_state: str
    step: int | None
    total: int | None
    checkpoint_step: int | None
    checkpoint_at: float | None
    checkpoint_mode: str | None  # a live runner's: "background" or "synchronous (why)"
    segments: int
    crashes: int
    last_stop_reason: str | None
    lease: str
    holder: str | None
    heartbeat_at: float | None
    lease_expires_at: float | None
    stop_requested: bool
    steps_per_second: float | None
    eta_seconds: float | None
    session_limit: float | None
    session_platform: str | None
    sessions_left: int | None
    updated_at: float
    now: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def newest_checkpoint(store: Store, *, probe: int = 3) -> tuple[int, float] | None:
    """``(step, created_at)`` of the newest checkpoint with a readable manifest."""
    dirs = sorted(
        (parsed[0], name)
        for name in store.list_dirs(CKPT_DIR)
        if (parsed := parse_dir(name)) is not None
    )
    for step, name in reversed(dirs[-probe:]):
        try:
            data = store.read_bytes(f"{CKPT_DIR}/{name}/{MANIFEST}")
            return step, Manifest.parse(data, dirname=name).created_at
        except (ObjectNotFoundError, CorruptCheckpointError):
            continue
    return None


def _total(record: JobRecord, status: dict[str, Any]) -> int | None:
    total = status.get("total") or status.get("total_steps")
    if isinstance(total, int):
        return total
    training = record.config.get("training") or {}
    script = script_config(record.config)
    if script is not None:  # a script job: its TrainingArguments (max_steps -1: epochs)
        training = script.get("training_args") or {}
    value = training.get("max_steps") if isinstance(training, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _pace(record: JobRecord, step: int | None, now: float) -> float | None:
    """Steps per second over the job's segments (start-up and saves included)."""
    steps = seconds = 0.0
    for seg in record.history:
        last, end = seg.last_step, seg.ended_at
        if seg.open and step is not None:
            last, end = step, now
        if last is None or end is None or end <= seg.started_at:
            continue
        steps += max(0, last - seg.first_step)
        seconds += end - seg.started_at
    return steps / seconds if steps > 0 and seconds > 0 else None


def session_length(record: JobRecord) -> tuple[float | None, str | None]:
    """``(seconds of training per session, platform label)`` for the job's platform: the
    spec's ``budget.limit`` if set, else the preset of the platform its last segment ran on,
    else of ``budget.platform``, else of this machine; less the ``budget.margin``."""
    from colabjob.runner.platforms import parse_budget, parse_duration

    budget: Any = record.config.get("budget") or {}
    if not isinstance(budget, dict):
        budget = {}
    label = record.history[-1].platform if record.history else None
    if label is None and budget.get("platform") not in (None, "auto"):
        label = str(budget["platform"])
    try:
        margin = parse_duration(budget.get("margin") or DEFAULT_MARGIN, what="margin")
        if budget.get("limit"):
            seconds = parse_budget(budget["limit"])
        elif label is not None and (label in PRESETS or label.split("-")[0] in PRESETS):
            seconds = PRESETS[label if label in PRESETS else label.split("-")[0]]
        else:
            info = describe_platform(platform=label)
            label = f"{info.name}-{info.tier}" if info.tier else info.name
            seconds = info.limit
    except ColabJobError:
        return None, label
    return (None if seconds is None else max(60.0, seconds - margin)), label


def summarize(store: Store, record: JobRecord, *, now: float) -> JobSummary:
    info, lease = LeaseObserver(store).poll()
    status = dict(info.status) if info is not None and lease is LeaseStatus.LIVE else {}
    ckpt = newest_checkpoint(store)
    candidates = [s for s in (record.last_step, ckpt[0] if ckpt else None) if s is not None]
    heartbeat_step = status.get("step")
    if isinstance(heartbeat_step, int):  # the live step, unless a newer commit overtook it
        candidates.append(heartbeat_step)
    step = max(candidates, default=None)
    total = _total(record, status)
    state = effective_state(record, lease)
    pace = _pace(record, step, now)
    eta = None
    if state is JobState.COMPLETED:
        eta = 0.0
    elif total is not None and step is not None and pace:
        eta = max(0, total - step) / pace
    limit, platform = session_length(record)
    sessions = None
    if eta is not None and limit:
        sessions = math.ceil(eta / limit) if eta > 0 else 0
    stop = read_stop_request(store) if state is JobState.RUNNING else None
    last_reason = next((s.stop_reason for s in reversed(record.history) if s.stop_reason), None)
    kind = (script_config(record.config) or record.config.get("job") or {}).get("kind")
    return JobSummary(
        url=store.url,
        job_id=record.job_id,
        kind=kind if isinstance(kind, str) else None,
        state=state.value,
        recorded_state=record.state.value,
        step=step,
        total=total,
        checkpoint_step=ckpt[0] if ckpt else None,
        checkpoint_at=ckpt[1] if ckpt else None,
        checkpoint_mode=mode if isinstance(mode := status.get("checkpoint_mode"), str) else None,
        segments=len(record.history),
        crashes=sum(s.stop_reason is StopReason.CRASH for s in record.history),
        last_stop_reason=last_reason.value if last_reason else None,
        lease=lease.value,
        holder=info.holder.describe() if info is not None else None,
        heartbeat_at=info.heartbeat_at if info is not None else None,
        lease_expires_at=info.expires_at if info is not None and not info.released else None,
        stop_requested=stop is not None and info is not None and stop.epoch >= info.epoch,
        steps_per_second=pace,
        eta_seconds=eta,
        session_limit=limit,
        session_platform=platform,
        sessions_left=sessions,
        updated_at=record.updated_at,
        now=now,
    )
