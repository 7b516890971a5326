"""The checkpoint commit protocol: stage, upload, manifest last, newest valid, retention.

A checkpoint is a fresh prefix ``ckpt/<step:012d>-<uid>/``. Its files are uploaded first, in
parallel and each atomically, hashed on the upload threads; then ``manifest.json`` is
*created* (create-only; on GCS ``ifGenerationMatch=0``) listing every file with size and
sha256. A prefix without a valid manifest does not exist: a crash at any point leaves the
previous checkpoint as the newest one and, at worst, an orphan prefix that
``sweep_staging()`` removes after a later commit. Nothing is overwritten in place. The lease
epoch (fencing token) is checked just before the manifest is created, so a runner that lost
its lease never commits. Retention runs only after a commit and deletes manifest first, then
data. Listing, selection and retention live in ``checkpoint_listing.py`` (the base class);
reading, verification and quarantine in ``catalog.py``; local staging and the
background upload thread in ``staging.py``; the manifest format in ``manifest.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import (
    AlreadyExistsError,
    CheckpointError,
    ConfigError,
    StaleEpochError,
    StorageError,
)

from .catalog import Catalog, CorruptCheckpointWarning, Verify
from .checkpoint_listing import CheckpointListing
from .manifest import (
    CKPT_DIR,
    MANIFEST,
    CheckpointInfo,
    CommitStats,
    Manifest,
    checkpoint_dir,
    default_versions,
    digest_bytes,
    digest_file,
    parse_dir,
)
from .staging import (
    FilesArg,
    PendingCommit,
    Written,
    make_staging_dir,
    parallel,
    resolve,
    stage_copies,
)

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "CheckpointInfo",
    "CheckpointStore",
    "CommitStats",
    "CorruptCheckpointWarning",
    "PendingCommit",
    "Verify",
]

log = logging.getLogger(__name__)

JOB_META = "job"  # manifest meta key of the job's id and spec (see CheckpointStore.job)


class CheckpointStore(CheckpointListing):
    """Checkpoints of one job under a ``Store``; see the module docstring for the protocol.

    ``keep`` >= 2 newest valid checkpoints survive retention. ``fence()`` returns the current
    lease epoch. ``clock`` (``colabjob.clock``) stamps ``created_at`` with its wall time and
    measures commit costs on its monotonic time (the clock that times the training steps).
    ``staging_dir`` (default: the system temp dir) is fast local disk for ``save_async``.
    ``workers`` threads upload (and hash) files in parallel. ``job`` (the record's
    ``job_id``, ``config`` and ``config_hash``) goes into every manifest's meta.
    """

    def __init__(
        self,
        store: Store,
        *,
        keep: int = 2,
        fence: Callable[[], int] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        staging_dir: str | os.PathLike[str] | None = None,
        workers: int = 4,
        job: Mapping[str, Any] | None = None,
    ) -> None:
        if keep < 2:
            raise ConfigError(
                f"keep={keep}: at least 2 checkpoints must be kept",
                hint="with one, a corrupt newest checkpoint would leave nothing to resume from",
            )
        if workers < 1:
            raise ConfigError(f"workers={workers}: need at least one upload thread")
        self.store = store
        self.keep = keep
        self.fence = fence
        self.clock = clock
        self.staging_dir = staging_dir
        self.workers = workers
        # The job's id and spec, copied into every manifest (meta["job"]) so that
        # `colabjob repair` can rebuild a lost or corrupt job.json from a checkpoint.
        self.job = dict(job) if job else None
        self.catalog = Catalog(store, clock=clock, workers=workers, scratch_dir=staging_dir)
        self._serial = threading.Lock()  # one save (sync, or staging + start) at a time
        self._pending: PendingCommit[CheckpointInfo] | None = None
        self._inflight: set[str] = set()

    def __repr__(self) -> str:
        return f"CheckpointStore({self.store!r}, keep={self.keep})"

    # ---- writing ------------------------------------------------------------------------

    def save(
        self,
        step: int,
        files: FilesArg,
        *,
        epoch: int = 0,
        config_hash: str = "",
        meta: Mapping[str, Any] | None = None,
        versions: Mapping[str, str] | None = None,
        prefix: str | None = None,
    ) -> CheckpointInfo:
        """Commit ``files`` as ``step`` and return it; blocks until committed.

        ``files``: ``{name: bytes | path | Written}``, a directory (every file under it), or a
        writer ``(staging_dir) -> {name: source}`` called here. ``versions`` adds to the
        recorded colabjob/python versions (e.g. torch); ``meta`` is any JSON-serialisable
        dict. ``prefix``: one from ``reserve(step)``, where ``Written`` files already lie.
        """
        with self._serial:
            self._wait_previous()
            t0 = self.clock.monotonic()
            staging = make_staging_dir(self.staging_dir, step) if callable(files) else None
            try:
                sources = resolve(files, staging)
                write_s = self.clock.monotonic() - t0 if staging is not None else 0.0
                return self._commit(
                    step, sources, epoch, config_hash, meta, versions, write_s, prefix
                )
            finally:
                self._inflight.discard(prefix or "")
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)

    def reserve(self, step: int) -> str:
        """A fresh prefix for ``step`` whose files others write in place (``Written``
        sources) before ``save(..., prefix=)`` commits it; not swept meanwhile."""
        _checked_meta(step, None)
        prefix = f"{CKPT_DIR}/{checkpoint_dir(step, uuid.uuid4().hex[:12])}"
        self._inflight.add(prefix)
        return prefix

    def save_async(
        self,
        step: int,
        files: FilesArg,
        *,
        epoch: int = 0,
        config_hash: str = "",
        meta: Mapping[str, Any] | None = None,
        versions: Mapping[str, str] | None = None,
        prefix: str | None = None,
    ) -> PendingCommit[CheckpointInfo]:
        """Stage to local disk, then upload and commit on a background thread.

        Path sources are copied into the staging directory before this returns, so the caller
        may overwrite its files at once; a writer ``(staging_dir) -> {name: path}`` runs on
        the background thread (serialise a CPU snapshot there). At most one commit is in
        flight: this first waits for the previous one (whose error, if any, is re-raised by
        its own ``wait()``). The staging directory is removed once the commit ends.
        ``prefix``: as for ``save``.
        """
        _checked_meta(step, meta)  # bad arguments fail here, not in the background
        with self._serial:
            self._wait_previous()
            t0 = self.clock.monotonic()
            staging = make_staging_dir(self.staging_dir, step)
            try:
                staged = None if callable(files) else stage_copies(resolve(files), staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            sync_s = self.clock.monotonic() - t0

            def work() -> CheckpointInfo:  # on the background thread
                try:
                    t1 = self.clock.monotonic()
                    sources = staged if staged is not None else resolve(files, staging)
                    write_s = sync_s + self.clock.monotonic() - t1
                    return self._commit(
                        step, sources, epoch, config_hash, meta, versions, write_s, prefix
                    )
                finally:
                    self._inflight.discard(prefix or "")
                    shutil.rmtree(staging, ignore_errors=True)

            self._pending = PendingCommit(step, work).start()
            return self._pending

    @property
    def pending(self) -> PendingCommit[CheckpointInfo] | None:
        """The last background commit, finished or not."""
        return self._pending

    def _wait_previous(self) -> None:
        prev = self._pending
        if prev is not None and not prev.done():
            # Its error was logged by the background thread and is re-raised by its own wait().
            with contextlib.suppress(BaseException):
                prev.wait()

    def _commit(
        self,
        step: int,
        sources: Mapping[str, bytes | Path | Written],
        epoch: int,
        config_hash: str,
        meta: Mapping[str, Any] | None,
        versions: Mapping[str, str] | None,
        write_s: float,
        reserved: str | None = None,
    ) -> CheckpointInfo:
        meta_d = _checked_meta(step, meta)
        if self.job is not None:
            meta_d.setdefault(JOB_META, self.job)
        prefix = reserved or f"{CKPT_DIR}/{checkpoint_dir(step, uuid.uuid4().hex[:12])}"
        got = parse_dir(prefix.rpartition("/")[2])
        if got is None or got[0] != step:
            raise ConfigError(f"prefix {prefix!r} is not one reserved for step {step}")
        uid = got[1]
        self._check_fence(step, epoch)  # fail fast, before paying for the upload
        self._inflight.add(prefix)
        try:
            t1 = self.clock.monotonic()
            entries = self._upload_all(prefix, sources)
            t2 = self.clock.monotonic()
            manifest = Manifest(
                step=step,
                uid=uid,
                epoch=epoch,
                created_at=float(self.clock.time()),
                files=entries,
                versions={**default_versions(), **dict(versions or {})},
                config_hash=config_hash,
                meta=meta_d,
            )
            self._check_fence(step, epoch)  # the lease may have moved during the upload
            try:
                self.store.create(f"{prefix}/{MANIFEST}", manifest.to_json())
            except AlreadyExistsError as e:  # a fresh uid: cannot happen short of a uid clash
                raise CheckpointError(f"{prefix}/{MANIFEST} already exists") from e
            t3 = self.clock.monotonic()
        finally:
            self._inflight.discard(prefix)
        stats = CommitStats(
            nbytes=sum(int(e["size"]) for e in entries.values()),
            nfiles=len(entries),
            write_seconds=write_s,
            upload_seconds=t2 - t1,
            commit_seconds=t3 - t2,
            total_seconds=write_s + (t3 - t1),
        )
        info = CheckpointInfo.of(manifest, stats=stats)
        log.info("committed checkpoint step %d at %s (%d bytes)", step, prefix, stats.nbytes)
        self._after_commit(info)
        return info

    def _upload_all(
        self, prefix: str, sources: Mapping[str, bytes | Path | Written]
    ) -> dict[str, dict[str, Any]]:
        """Hash and upload every file; each file's hash and its upload run as separate tasks
        so hashing overlaps the transfer (hashlib releases the GIL on large buffers).
        ``Written`` files are in place already: only their stored size is checked."""
        crc = bool(self.store.crc32c_supported)
        names = sorted(sources)

        def task(job: tuple[str, str]) -> dict[str, Any] | None:
            what, name = job
            src, key = sources[name], f"{prefix}/{name}"
            if isinstance(src, Written):
                return {"size": src.size, "sha256": src.sha256} if what == "hash" else None
            if what == "hash":
                if isinstance(src, bytes):
                    return digest_bytes(src, crc32c=crc)
                return digest_file(src, crc32c=crc)
            if isinstance(src, bytes):
                self.store.write_bytes(key, src)
            else:
                self.store.put_file(src, key)
            return None

        jobs = [(what, name) for name in names for what in ("put", "hash")]
        results = parallel(task, jobs, workers=2 * self.workers)
        entries = {name: r for (what, name), r in zip(jobs, results, strict=True) if r}
        for name in names:
            size = self.store.size(f"{prefix}/{name}")
            if size != entries[name]["size"]:
                raise CheckpointError(
                    f"uploaded {prefix}/{name} has {size} bytes, expected "
                    f"{entries[name]['size']} (was the source changed during the save?)",
                    hint="keep checkpoint sources unchanged until save() returns; then retry",
                )
        return entries

    def _check_fence(self, step: int, epoch: int) -> None:
        if self.fence is None:
            return
        current = int(self.fence())
        if epoch < current:
            raise StaleEpochError(
                f"checkpoint of step {step} was written under lease epoch {epoch}, "
                f"but the job's lease is now at epoch {current}",
                hint="another runner took over this job; stop this one",
            )

    def _after_commit(self, info: CheckpointInfo) -> None:
        """Retention and sweeping are housekeeping: the commit stands even if they fail."""
        try:
            self.apply_retention(protect=info.prefix)
            self.sweep_staging()
        except StorageError as e:
            log.warning("checkpoint housekeeping after step %d failed: %s", info.step, e)

def _checked_meta(step: int, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    if step < 0:
        raise ConfigError(f"checkpoint step must be >= 0, got {step}")
    meta_d = dict(meta or {})
    try:
        json.dumps(meta_d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"checkpoint meta must be JSON-serialisable: {e}") from e
    return meta_d
