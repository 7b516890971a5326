"""Reading a job's committed metrics and events back from storage (for ``logs``, ``plot``,
``status``), without torch.

Where metrics live: every checkpoint carries the job's whole metrics history up to its step
(``metrics.json``, a JSON list of rows written by ``colabjob.jobs.state.capture``). A resumed
segment restores that history and appends to it, so the newest committed checkpoint holds every
row exactly once: rows logged after the last commit of a segment that was killed are not
in it, and are logged again (once) by the segment that redoes those steps. Older
checkpoints may be deleted by retention without losing history. A row is a flat JSON object
with ``step`` and metric values (``loss``, ``lr``, ...); a row with an ``event`` key is an
event the training loop logged.

Events that are facts about the job rather than about training (segments starting and
stopping with their reason, crashes and retries, checkpoints committed) come from
``job.json``'s history and the checkpoint manifests. ``job_log`` merges both into one
stream of JSON objects, the content of ``colabjob logs``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from colabjob.errors import ObjectNotFoundError
from colabjob.runner.record import JobRecord, Segment, load_record
from colabjob.storage.manifest import CheckpointInfo, digest_bytes, mismatch

if TYPE_CHECKING:
    from colabjob.storage.store import Store

log = logging.getLogger(__name__)

#: Names a checkpoint's metrics history may have (``jobs.state.format.METRICS_FILE`` first).
METRICS_FILES = ("metrics.json", "metrics.jsonl")


@dataclass(frozen=True, kw_only=True)
class JobHistory:
    """What a job has committed: metric rows (step order), its segments and checkpoints."""

    record: JobRecord
    rows: tuple[dict[str, Any], ...] = ()
    checkpoints: tuple[CheckpointInfo, ...] = ()
    source: str | None = None  # the checkpoint prefix the rows were read from
    warnings: tuple[str, ...] = field(default=())

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self.record.history

    @property
    def checkpoint_step(self) -> int | None:
        return self.checkpoints[-1].step if self.checkpoints else None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one numeric metric, in step order."""
        steps: list[int] = []
        values: list[float] = []
        for row in self.rows:
            v = row.get(key)
            if "event" not in row and _is_number(v) and _is_number(row.get("step")):
                steps.append(int(row["step"]))
                values.append(float(v))
        return steps, values


def _is_number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_rows(data: bytes) -> list[dict[str, Any]]:
    """Rows from a JSON list or from JSON Lines (blank lines skipped)."""
    text = data.decode("utf-8").strip()
    if not text:
        return []
    if text.startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("metrics must be a list of JSON objects")
    return rows


def list_checkpoints(store: Store) -> list[CheckpointInfo]:
    """Committed checkpoints, oldest first (manifests parsed, bytes not verified)."""
    from colabjob.storage.checkpoints import CheckpointStore

    return CheckpointStore(store).list()


def _read_verified(store: Store, info: CheckpointInfo, name: str) -> bytes:
    entry = info.files[name]
    data = store.read_bytes(info.key(name))
    problem = mismatch(name, entry, digest_bytes(data, crc32c="crc32c" in entry))
    if problem:
        raise ValueError(problem)
    return data


def read_rows(
    store: Store, checkpoints: list[CheckpointInfo]
) -> tuple[list[dict[str, Any]], str | None, list[str]]:
    """The metrics history of the newest checkpoint whose metrics file verifies.

    Read-only: a bad file is skipped with a warning (never quarantined from here).
    """
    warnings: list[str] = []
    for info in reversed(checkpoints):
        name = next((n for n in METRICS_FILES if n in info.files), None)
        if name is None:
            continue
        try:
            rows = parse_rows(_read_verified(store, info, name))
        except ObjectNotFoundError:
            continue  # deleted by retention while we listed
        except (ValueError, UnicodeDecodeError) as e:
            warnings.append(f"{info.prefix}/{name}: {e}; using an older checkpoint")
            continue
        limit = info.step
        kept = [r for r in rows if not _is_number(r.get("step")) or int(r["step"]) <= limit]
        kept.sort(key=lambda r: int(r["step"]) if _is_number(r.get("step")) else -1)
        return kept, info.prefix, warnings
    return [], None, warnings


def load_history(store: Store, record: JobRecord | None = None) -> JobHistory:
    """The job's record, committed checkpoints and committed metrics."""
    record = record if record is not None else load_record(store)
    checkpoints = list_checkpoints(store)
    rows, source, warnings = read_rows(store, checkpoints)
    return JobHistory(
        record=record,
        rows=tuple(rows),
        checkpoints=tuple(checkpoints),
        source=source,
        warnings=tuple(warnings),
    )


def job_events(history: JobHistory) -> list[dict[str, Any]]:
    """Events from the record (segments, crashes, retries) and the checkpoints present."""
    events: list[dict[str, Any]] = []
    for i, seg in enumerate(history.segments):
        events.append(
            {
                "event": "segment_start",
                "time": seg.started_at,
                "step": seg.first_step,
                "segment": i,
                "session_id": seg.session_id,
                "platform": seg.platform,
                "host": seg.host,
                "epoch": seg.epoch,
            }
        )
        if seg.ended_at is not None or seg.stop_reason is not None:
            end: dict[str, Any] = {
                "event": "segment_end",
                "time": seg.ended_at,
                "step": seg.last_step,
                "segment": i,
                "session_id": seg.session_id,
                "stop_reason": seg.stop_reason.value if seg.stop_reason else None,
            }
            if seg.error:
                end["error"] = seg.error
            events.append(end)
    for info in history.checkpoints:
        events.append(
            {
                "event": "checkpoint",
                "time": info.created_at,
                "step": info.step,
                "bytes": info.nbytes,
                "epoch": info.epoch,
                "prefix": info.prefix,
            }
        )
    return events


# At one step: the rows of that step, its checkpoint, the segment that stopped there, then
# the segment that resumed from it.
_ORDER = {"checkpoint": 2, "segment_end": 3, "segment_start": 4}


def _sort_key(item: Mapping[str, Any]) -> tuple[float, int, float]:
    step = item.get("step")
    t = item.get("time")
    return (
        float(step) if _is_number(step) else float("inf"),
        _ORDER.get(str(item.get("event")), 1),
        float(t) if _is_number(t) else 0.0,
    )


def job_log(history: JobHistory) -> list[dict[str, Any]]:
    """Every committed row and job event as one list: by time when every item has one,
    else by step (at one step: rows, checkpoint, segment end, next segment's start)."""
    items = [*history.rows, *job_events(history)]
    if all(_is_number(i.get("time")) for i in items):
        return sorted(items, key=lambda i: (float(i["time"]), _sort_key(i)))
    return sorted(items, key=_sort_key)


def iter_jsonl(items: list[dict[str, Any]]) -> Iterator[str]:
    for item in items:
        yield json.dumps(item, sort_keys=False, default=str)
