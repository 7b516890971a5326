"""Moving a job between stores (Drive → GCS for a handoff), and the marker left behind.

``copy_job`` copies a paused job's committed checkpoints, its other files and, last, its
record to an empty destination. Each checkpoint keeps the commit protocol: every file is
downloaded to local scratch space, hashed and checked against the manifest's size and sha256
(a file that does not match is refused: its checkpoint is not copied and whatever of it was
uploaded is removed), uploaded, and checked again on the destination (size, and the
server's crc32c where the backend keeps one); only then is the manifest created there,
create-only and byte for byte. Quarantined checkpoints, orphan prefixes and the control
objects (lease, stop request) stay behind. A copy that was interrupted can simply be run
again: identical committed checkpoints are skipped.

``mark_moved`` then writes ``control/moved.json`` at the old location and notes the move in
its record (``extras.moved_to``/``moved_at``); ``check_not_moved`` is what a runner calls
before it starts, so the old location refuses to run and points at the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import (
    AlreadyExistsError,
    CheckpointError,
    CorruptCheckpointError,
    JobMovedError,
    ObjectNotFoundError,
    StorageError,
)
from colabjob.runner.lease.info import format_time
from colabjob.runner.record import RECORD_KEY, JobRecord, load_record, read_record, update_record
from colabjob.storage.manifest import (
    CKPT_DIR,
    MANIFEST,
    QUARANTINE_DIR,
    Manifest,
    digest_file,
    mismatch,
    parse_dir,
)
from colabjob.storage.staging import parallel

if TYPE_CHECKING:
    from colabjob.storage.store import Store

__all__ = [
    "MOVED_KEY",
    "MovedMarker",
    "TransferReport",
    "check_not_moved",
    "copy_job",
    "mark_moved",
    "read_moved",
]

MOVED_KEY = "control/moved.json"
CONTROL_DIR = "control"
# Never copied: where the job runs is decided anew at the destination.
_LEFT_BEHIND = (CONTROL_DIR + "/", QUARANTINE_DIR + "/", CKPT_DIR + "/")


@dataclass(frozen=True, kw_only=True)
class MovedMarker:
    """``control/moved.json``: this job now lives at ``moved_to``."""

    moved_to: str
    moved_at: float
    moved_by: str = ""
    last_step: int | None = None

    def __post_init__(self) -> None:
        if not self.moved_to:
            raise ValueError("MovedMarker.moved_to must not be empty")

    def to_json(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> MovedMarker:
        d = json.loads(data)
        step = d.get("last_step")
        return cls(
            moved_to=str(d["moved_to"]),
            moved_at=float(d.get("moved_at", 0.0)),
            moved_by=str(d.get("moved_by", "")),
            last_step=None if step is None else int(step),
        )


def read_moved(store: Store) -> MovedMarker | None:
    """The move marker of the job at ``store``, or None if it was never moved."""
    try:
        return MovedMarker.from_json(store.read_bytes(MOVED_KEY))
    except ObjectNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        # A marker we cannot read still means "moved": refuse rather than run twice.
        return MovedMarker(moved_to=f"(unreadable {MOVED_KEY}: {e})", moved_at=0.0)


def check_not_moved(store: Store, record: JobRecord | None = None) -> None:
    """Raise ``JobMovedError`` (pointing at the new URL) if the job at ``store`` was moved.

    Runners call this before they take the lease. ``record``, when the caller already read
    it, is checked too (``extras.moved_to``), in case the marker was deleted by hand.
    """
    marker = read_moved(store)
    if marker is None and record is not None and record.extras.get("moved_to"):
        marker = MovedMarker(
            moved_to=str(record.extras["moved_to"]),
            moved_at=float(record.extras.get("moved_at") or 0.0),
        )
    if marker is None:
        return
    when = f" at {format_time(marker.moved_at)}" if marker.moved_at else ""
    raise JobMovedError(
        f"job {store.url} was moved to {marker.moved_to}{when}; this copy must not run",
        moved_to=marker.moved_to,
        hint=f"run it there: `colabjob resume {marker.moved_to}` "
        f"(or `colabjob status {marker.moved_to}`)",
    )


def mark_moved(store: Store, marker: MovedMarker, *, clock: Clock = SYSTEM_CLOCK) -> JobRecord:
    """Make the old location refuse to run: write the marker, then note it in the record."""
    store.write_bytes(MOVED_KEY, marker.to_json())
    return update_record(
        store,
        lambda r: r.with_extras(moved_to=marker.moved_to, moved_at=marker.moved_at),
        clock=clock,
    )


@dataclass(frozen=True, kw_only=True)
class TransferReport:
    """What ``copy_job`` did. Steps are ascending."""

    source: str
    destination: str
    job_id: str
    copied: tuple[int, ...] = ()  # checkpoints copied now
    already_there: tuple[int, ...] = ()  # identical checkpoints found at the destination
    refused: tuple[tuple[str, str], ...] = ()  # (checkpoint dir, problem): not copied
    other_files: int = 0
    nbytes: int = 0

    @property
    def steps(self) -> tuple[int, ...]:
        """Every checkpoint the destination now holds from this job."""
        return tuple(sorted({*self.copied, *self.already_there}))

    @property
    def latest_step(self) -> int | None:
        return self.steps[-1] if self.steps else None

    def describe(self) -> str:
        text = (
            f"copied job {self.job_id} from {self.source} to {self.destination}: "
            f"{len(self.copied)} checkpoint(s) copied, {len(self.already_there)} already there, "
            f"{self.other_files} other file(s), {self.nbytes / 1e6:.1f} MB; "
            f"newest step {self.latest_step}"
        )
        for dirname, problem in self.refused:
            text += f"\n  REFUSED {CKPT_DIR}/{dirname}: {problem}"
        return text


def copy_job(
    src: Store,
    dst: Store,
    *,
    clock: Clock = SYSTEM_CLOCK,
    workers: int = 4,
    scratch_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> TransferReport:
    """Copy the job at ``src`` to ``dst`` (see the module docstring); return what was done.

    ``dst`` must hold no job, or this same job from an earlier, interrupted copy.
    ``CorruptCheckpointError`` if ``src`` has checkpoints and none of them verifies (then no
    record is written at ``dst``). The caller keeps runners away from ``src`` meanwhile.
    """
    say = log or (lambda _msg: None)
    record = load_record(src)
    previous = read_record(dst)
    if previous is not None and (
        previous[0].job_id != record.job_id or previous[0].extras.get("moved_from") != src.url
    ):
        raise AlreadyExistsError(
            f"{dst.url} already holds job {previous[0].job_id}",
            hint="choose an empty destination (another --to prefix)",
        )
    report = TransferReport(source=src.url, destination=dst.url, job_id=record.job_id)
    scratch = Path(tempfile.mkdtemp(prefix="colabjob-transfer-", dir=scratch_dir))
    try:
        report = _copy_checkpoints(src, dst, report, scratch, workers, say)
        if report.refused and not report.steps:
            raise CorruptCheckpointError(
                f"no checkpoint of {src.url} verifies against its manifest, nothing was moved: "
                + "; ".join(f"{d}: {p}" for d, p in report.refused),
                hint="resume the job where it is (colabjob falls back to an older checkpoint) "
                "or restart it",
            )
        report = _copy_other_files(src, dst, report, scratch, workers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if previous is None:
        moved = dataclasses.replace(
            record.with_extras(moved_from=src.url, moved_at=clock.time()),
            updated_at=clock.time(),
        )
        dst.create(RECORD_KEY, moved.to_json())  # last: without it, dst holds no job
    say(report.describe())
    return report


def _copy_checkpoints(
    src: Store,
    dst: Store,
    report: TransferReport,
    scratch: Path,
    workers: int,
    say: Callable[[str], None],
) -> TransferReport:
    dirs = sorted(
        {parts[1] for k in src.list(CKPT_DIR) if len(parts := k.split("/")) >= 3}
    )
    copied, there, refused = list(report.copied), list(report.already_there), list(report.refused)
    nbytes = report.nbytes
    for dirname in dirs:
        if parse_dir(dirname) is None:
            continue
        try:
            raw = src.read_bytes(f"{CKPT_DIR}/{dirname}/{MANIFEST}")
        except ObjectNotFoundError:
            continue  # never committed (or being deleted by retention): not a checkpoint
        try:
            manifest = Manifest.parse(raw, dirname=dirname)
        except CorruptCheckpointError as e:
            refused.append((dirname, str(e)))
            continue
        outcome = _copy_one(src, dst, dirname, raw, manifest, scratch / dirname, workers)
        if outcome == "copied":
            copied.append(manifest.step)
            nbytes += sum(int(e["size"]) for e in manifest.files.values())
            say(f"copied checkpoint step {manifest.step} ({CKPT_DIR}/{dirname})")
        elif outcome == "already there":
            there.append(manifest.step)
        else:
            refused.append((dirname, outcome))
            say(f"REFUSED checkpoint step {manifest.step} ({CKPT_DIR}/{dirname}): {outcome}")
    return dataclasses.replace(
        report,
        copied=tuple(sorted(copied)),
        already_there=tuple(sorted(there)),
        refused=tuple(refused),
        nbytes=nbytes,
    )


def _copy_one(
    src: Store,
    dst: Store,
    dirname: str,
    raw: bytes,
    manifest: Manifest,
    scratch: Path,
    workers: int,
) -> str:
    """Copy one committed checkpoint: "copied", "already there", or the problem."""
    prefix = f"{CKPT_DIR}/{dirname}"
    manifest_key = f"{prefix}/{MANIFEST}"
    existing = dst.read_versioned(manifest_key)
    if existing is not None:
        if existing[0] != raw:
            raise CheckpointError(
                f"{dst.url_of(manifest_key)} exists with different content",
                hint="the destination holds another job's files: choose an empty --to",
            )
        if (problem := _destination_problem(dst, prefix, manifest)) is not None:
            raise CheckpointError(
                f"{dst.url_of(prefix)} is committed but damaged ({problem})",
                hint=f"delete {dst.url_of(prefix)}/ and run the handoff again",
            )
        return "already there"
    crc = bool(dst.crc32c_supported)

    def one(name: str) -> str | None:
        entry, key = manifest.files[name], f"{prefix}/{name}"
        local = scratch / name
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            src.get_file(key, local)
        except ObjectNotFoundError:
            return f"{name}: missing at the source"
        try:
            actual = digest_file(local, crc32c=crc)
            if (problem := mismatch(name, entry, actual)) is not None:
                return f"{problem} at the source"
            dst.put_file(local, key)
        finally:
            with contextlib.suppress(OSError):
                local.unlink()
        if (size := dst.size(key)) != entry["size"]:
            return f"{name}: {size} bytes after upload, expected {entry['size']}"
        if crc and (remote := dst.crc32c(key)) is not None and remote != actual["crc32c"]:
            return f"{name}: crc32c after upload {remote} != {actual['crc32c']}"
        return None

    try:
        problems = [p for p in parallel(one, sorted(manifest.files), workers=workers) if p]
    except BaseException:
        dst.delete_prefix(prefix)
        raise
    if problems:
        dst.delete_prefix(prefix)  # nothing of a refused checkpoint stays at the destination
        return "; ".join(problems)
    dst.create(manifest_key, raw)  # last, create-only, byte for byte: the commit
    return "copied"


def _destination_problem(dst: Store, prefix: str, manifest: Manifest) -> str | None:
    for name, entry in sorted(manifest.files.items()):
        try:
            size = dst.size(f"{prefix}/{name}")
        except ObjectNotFoundError:
            return f"{name}: missing"
        if size != entry["size"]:
            return f"{name}: size {size} != manifest {entry['size']}"
    return None


def _copy_other_files(
    src: Store, dst: Store, report: TransferReport, scratch: Path, workers: int
) -> TransferReport:
    """Everything that is not a checkpoint, control object or the record (metrics, logs,
    tokenizer files...): byte for byte, size-checked (crc32c-checked on GCS)."""
    keys = [
        k
        for k in src.list()
        if k != RECORD_KEY and not k.startswith(_LEFT_BEHIND)
    ]
    crc = bool(dst.crc32c_supported)

    def one(key: str) -> int:
        local = scratch / "other" / key
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            src.get_file(key, local)
        except ObjectNotFoundError:
            return 0  # deleted meanwhile
        try:
            digest = digest_file(local, crc32c=crc)
            dst.put_file(local, key)
        finally:
            with contextlib.suppress(OSError):
                local.unlink()
        if dst.size(key) != digest["size"] or (
            crc and (remote := dst.crc32c(key)) is not None and remote != digest["crc32c"]
        ):
            raise StorageError(
                f"{dst.url_of(key)} does not match {src.url_of(key)} after the copy",
                hint="run the handoff again (the copy resumes)",
            )
        return int(digest["size"])

    sizes = parallel(one, keys, workers=workers)
    return dataclasses.replace(
        report, other_files=report.other_files + len(keys), nbytes=report.nbytes + sum(sizes)
    )

