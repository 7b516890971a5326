"""What every handoff engine (a GCE VM, a SkyPilot managed job, a Kaggle chain) does before
and around its own launch: the cheap checks on the job (it exists, was not moved, is not
finished, no live runner holds its lease: "job not paused"; warnings about local paths in
its config) and on its ``gs://`` destination (reachable, free or an earlier copy of this
job), the verified copy under the old location's lease that then marks it as moved, and
the startup script or task file written where the user can read it.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.clock import Clock
from colabjob.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    ConfigError,
    CredentialsError,
    JobNotPausedError,
    JobStateError,
    LeaseHeldError,
    LeaseLostError,
    StorageError,
)
from colabjob.runner.handoff.transfer import (
    MovedMarker,
    TransferReport,
    check_not_moved,
    copy_job,
    mark_moved,
)
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import Holder, LeaseObserver, format_time
from colabjob.runner.record import JobRecord, load_record, read_record
from colabjob.runner.states import JobState, LeaseStatus
from colabjob.storage.store import open_store

if TYPE_CHECKING:
    from colabjob.storage.store import Store

_LOCAL_PREFIXES = ("/", "./", "../", "~", "file://")


# -- the job ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PreparedJob:
    """A job that may be handed off (to a GCE VM or a SkyPilot managed job), and where to."""

    src: Store
    dst: Store  # its gs:// home from now on (src itself when it is on GCS already)
    record: JobRecord
    copy_needed: bool
    warnings: tuple[str, ...]


def check_to(to: str | None) -> None:
    if to is not None and not to.startswith("gs://"):
        raise ConfigError(f"--to {to!r} is not a gs:// URL", hint="e.g. --to gs://BUCKET/jobs/NAME")


def prepare_job(
    job_url: str, *, to: str | None, clock: Clock, extra_packages: Sequence[str] = ()
) -> PreparedJob:
    """The cheap checks every engine shares, before anything is copied: the job may be
    handed off, and its GCS destination is reachable and free."""
    check_to(to)
    src = open_store(job_url)
    record, lease_warnings = _check_job(src, clock)
    warnings = [*lease_warnings, *_config_warnings(record, extra_packages)]
    dst, copy_needed = _destination(src, to)
    if copy_needed:
        _check_destination_free(dst, src, record)
    return PreparedJob(
        src=src, dst=dst, record=record, copy_needed=copy_needed, warnings=tuple(warnings)
    )


def _check_job(src: Store, clock: Clock) -> tuple[JobRecord, list[str]]:
    """The job's record if it may be handed off, and warnings about its lease."""
    record = load_record(src)
    check_not_moved(src, record)
    if record.state in (JobState.COMPLETED, JobState.CANCELLED):
        raise JobStateError(
            f"job {src.url} is {record.state}: there is nothing left to run on a VM",
            hint=f"see `colabjob status {src.url}`",
        )
    info, status = LeaseObserver(src, clock=clock).poll()
    if info is None:
        return record, []
    if status is LeaseStatus.LIVE:
        raise JobNotPausedError(
            f"job not paused: {src.url} is running on {info.holder.describe()} (epoch "
            f"{info.epoch}, last heartbeat {format_time(info.heartbeat_at)})",
            hint=f"pause it first: `colabjob stop {src.url}` (it commits a checkpoint and "
            "exits), then run the handoff again",
        )
    if status is LeaseStatus.STALE:
        return record, [
            f"the lease of {src.url} looks abandoned ({info.holder.describe()}, last "
            f"heartbeat {format_time(info.heartbeat_at)}); it is confirmed expired by watching "
            f"it for up to {info.ttl:.0f}s before the job is taken over"
        ]
    return record, []


def _config_warnings(record: JobRecord, extra_packages: Sequence[str]) -> Iterator[str]:
    for key, value in _strings(record.config):
        if key != "job.storage" and value.startswith(_LOCAL_PREFIXES):
            yield (
                f"the job's config has {key}: {value!r}, a local path the VM will not have; "
                "put it in GCS, on the Hub, or in a package passed with --pip"
            )
    job = record.config.get("job")
    if isinstance(job, Mapping) and job.get("kind") == "python" and not extra_packages:
        yield (
            f"job.kind is python: {job.get('entrypoint')!r} must be importable on the VM; "
            "pass its package with --pip (a PyPI name, a wheel URL or git+https://...)"
        )


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, str):
        yield key, node
    elif isinstance(node, Mapping):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")


# -- the destination ----------------------------------------------------------------------
def _destination(src: Store, to: str | None) -> tuple[Store, bool]:
    if to is None or to.rstrip("/") == src.url:
        if src.url.startswith("gs://"):
            return src, False
        raise ConfigError(
            f"job {src.url} is not on GCS, and the VM can only reach GCS",
            hint="add --to gs://BUCKET/PATH (ideally a bucket in the VM's region): its "
            "checkpoints and record are copied there and verified",
        )
    try:
        dst = open_store(to)
    except (BucketNotFoundError, CredentialsError):  # already say what to do
        raise
    except StorageError as e:
        raise BucketNotFoundError(
            f"cannot reach {to}: {e}",
            hint="check the bucket name and the credentials of this machine "
            "(`gcloud auth application-default login`; in Colab "
            "`google.colab.auth.authenticate_user()`); you need roles/storage.objectAdmin",
        ) from e
    return dst, dst.url != src.url


def _check_destination_free(dst: Store, src: Store, record: JobRecord) -> None:
    got = read_record(dst)
    if got is None:
        return
    there = got[0]
    if there.job_id == record.job_id and there.extras.get("moved_from") == src.url:
        return  # an earlier handoff of this job copied it already; the copy resumes
    raise AlreadyExistsError(
        f"{dst.url} already holds job {there.job_id}",
        hint="choose an empty destination (another --to prefix)",
    )


# -- moving -------------------------------------------------------------------------------
def move_job(
    src: Store, dst: Store, *, clock: Clock, say: Callable[[str], None]
) -> TransferReport:
    """Copy under the old location's lease (no runner can start meanwhile), then mark it."""
    lease = Lease(src, holder=Holder.here(platform="handoff"), clock=clock)
    try:
        lease.acquire()
    except LeaseLostError:
        raise
    except LeaseHeldError as e:
        raise JobNotPausedError(
            f"job not paused: {e}", hint=f"pause it first: `colabjob stop {src.url}`"
        ) from e
    beat = lease.start_heartbeat()
    try:
        say(f"copying {src.url} to {dst.url} (every file verified against its manifest)")
        report = copy_job(src, dst, clock=clock, log=say)
        if beat.lost is not None:
            raise JobNotPausedError(
                f"another runner took {src.url} over during the copy: {beat.lost}",
                hint=f"the copy at {dst.url} may be behind; pause the job and hand off again",
            )
        marker = MovedMarker(
            moved_to=dst.url,
            moved_at=clock.time(),
            moved_by=socket.gethostname(),
            last_step=report.latest_step,
        )
        mark_moved(src, marker, clock=clock)
        say(f"{src.url} is marked as moved to {dst.url}; it refuses to run from now on")
        return report
    finally:
        beat.stop()
        lease.release()


def write_plan_file(script: str, script_path: str | Path | None, default_name: str) -> Path:
    """Write a startup script or task file to ``script_path`` (default: a temp folder)."""
    if script_path is None:
        folder = Path(tempfile.gettempdir()) / "colabjob-handoff"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / default_name
    else:
        path = Path(script_path)
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    return path.resolve()
