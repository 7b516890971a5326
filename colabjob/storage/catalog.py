"""The read side of the commit protocol: which checkpoints exist, and are their bytes intact.

A ``Catalog`` lists the committed checkpoints of a store (a ``ckpt/<dir>/`` with a readable
``manifest.json``), orders them by step (never by mtime), verifies them (sizes cheaply, or
every byte against sha256), reads and fetches files with verification, and quarantines a
corrupt checkpoint by moving its manifest to ``quarantine/<dir>/manifest.json`` next to a
``reason.json``: it is no longer listed, and nothing is deleted. A verification failure
caused by retention deleting the checkpoint meanwhile (manifest first) is not corruption.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn

from colabjob.clock import Clock
from colabjob.errors import CorruptCheckpointError, ObjectNotFoundError

from .manifest import (
    CKPT_DIR,
    MANIFEST,
    QUARANTINE_DIR,
    CheckpointInfo,
    Manifest,
    digest_bytes,
    digest_file,
    mismatch,
    parse_dir,
)
from .staging import parallel

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

Verify = Literal["none", "size", "full"]


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint failed verification, was quarantined, and an older one is used instead."""


class Catalog:
    """Listing, verification, verified reads and quarantine over one ``Store``."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock,
        workers: int,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.workers = workers
        self.scratch_dir = scratch_dir

    # ---- listing ------------------------------------------------------------------------

    def groups(self) -> dict[str, set[str]]:
        """``{dirname: {file names}}`` for every well-formed directory under ``ckpt/``."""
        groups: dict[str, set[str]] = {}
        for key in self.store.list(CKPT_DIR):
            parts = key.split("/", 2)
            if len(parts) == 3 and parts[0] == CKPT_DIR and parse_dir(parts[1]):
                groups.setdefault(parts[1], set()).add(parts[2])
        return groups

    def quarantined(self) -> set[str]:
        return set(self.store.list_dirs(QUARANTINE_DIR))

    def load(self, dirname: str) -> CheckpointInfo | None:
        """The checkpoint in ``dirname``; None if its manifest vanished (retention raced us).
        A manifest that does not parse raises ``CorruptCheckpointError``."""
        try:
            data = self.store.read_bytes(f"{CKPT_DIR}/{dirname}/{MANIFEST}")
        except ObjectNotFoundError:
            return None
        return CheckpointInfo.of(Manifest.parse(data, dirname=dirname))

    def list(self) -> builtins.list[CheckpointInfo]:
        """Checkpoints with a readable manifest, oldest first."""
        out: builtins.list[CheckpointInfo] = []
        for dirname, names in sorted(self.groups().items()):
            if MANIFEST not in names:
                continue
            try:
                info = self.load(dirname)
            except CorruptCheckpointError as e:
                log.warning("skipping %s/%s: %s", CKPT_DIR, dirname, e)
                continue
            if info is not None:
                out.append(info)
        return sorted(out, key=CheckpointInfo.order)

    def newest_first(self, verify: Verify) -> Iterator[tuple[CheckpointInfo, str | None]]:
        """``(info, problem)`` newest first; manifests are read lazily, one step at a time,
        and one that does not parse is quarantined on the way."""
        by_step: dict[int, builtins.list[str]] = {}
        for dirname, names in self.groups().items():
            parsed = parse_dir(dirname)
            if MANIFEST in names and parsed is not None:
                by_step.setdefault(parsed[0], []).append(dirname)
        for step in sorted(by_step, reverse=True):
            infos: builtins.list[CheckpointInfo] = []
            for dirname in by_step[step]:
                try:
                    info = self.load(dirname)
                except CorruptCheckpointError as e:
                    self.quarantine(dirname, str(e))
                    continue
                if info is not None:
                    infos.append(info)
            for info in sorted(infos, key=CheckpointInfo.order, reverse=True):
                yield info, self.verify(info, verify)

    def latest(self, verify: Verify) -> CheckpointInfo | None:
        for info, problem in self.newest_first(verify):
            if problem is None:
                return info
            self.quarantine(info.dirname, problem)
        return None

    # ---- verification -------------------------------------------------------------------

    def verify(self, info: CheckpointInfo, level: Verify) -> str | None:
        """Why ``info`` is not intact at ``level``, or None."""
        if level == "none":
            return None
        if level == "full":
            with tempfile.TemporaryDirectory(prefix="colabjob-verify-", dir=self.scratch_dir) as d:
                problems = [p for p in self.download_all(info, Path(d)) if p]
            return "; ".join(problems) or None
        for name, entry in sorted(info.files.items()):
            try:
                size = self.store.size(info.key(name))
            except ObjectNotFoundError:
                return f"{name}: missing"
            if size != entry["size"]:
                return f"{name}: size {size} != manifest {entry['size']}"
        return None

    def download_all(self, info: CheckpointInfo, into: Path) -> builtins.list[str | None]:
        """Download every file of ``info`` under ``into`` (in parallel, hashing each as it
        lands); return one problem (or None) per file."""

        def one(name: str) -> str | None:
            entry = info.files[name]
            local = into / name
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.store.get_file(info.key(name), str(local))
            except ObjectNotFoundError:
                return f"{name}: missing"
            return mismatch(name, entry, digest_file(local, crc32c="crc32c" in entry))

        return parallel(one, sorted(info.files), workers=self.workers)

    def read(self, info: CheckpointInfo, name: str) -> bytes:
        try:
            entry = info.files[name]
        except KeyError:
            raise ObjectNotFoundError(
                f"checkpoint step {info.step} has no file {name!r}",
                hint=f"it holds: {', '.join(sorted(info.files))}",
            ) from None
        try:
            data = self.store.read_bytes(info.key(name))
        except ObjectNotFoundError:
            self.corrupt(info, f"{name}: missing")
        problem = mismatch(name, entry, digest_bytes(data, crc32c="crc32c" in entry))
        if problem:
            self.corrupt(info, problem)
        return data

    def fetch(self, info: CheckpointInfo, local_dir: str | os.PathLike[str]) -> Path:
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".colabjob-fetch-", dir=dest))
        try:
            problems = [p for p in self.download_all(info, tmp) if p]
            if problems:
                self.corrupt(info, "; ".join(problems))
            # Only verified bytes reach their final names, each by an atomic rename.
            for name in sorted(info.files):
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / name, dest / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ---- quarantine ---------------------------------------------------------------------

    def corrupt(self, info: CheckpointInfo, problem: str) -> NoReturn:
        self.quarantine(info.dirname, problem)
        raise CorruptCheckpointError(
            f"checkpoint step {info.step} ({info.prefix}) is corrupt: {problem}",
            hint="it was quarantined; latest() now returns the previous valid checkpoint",
        )

    def quarantine(self, dirname: str, problem: str, *, message: str | None = None) -> bool:
        """Move the manifest to ``quarantine/<dirname>/`` so the checkpoint is not listed.
        False if the manifest was already gone (deleted by retention: not corruption).
        ``message`` replaces the corruption warning (a checkpoint set aside on purpose is
        logged, not warned about)."""
        src = f"{CKPT_DIR}/{dirname}/{MANIFEST}"
        if not self.store.exists(src):
            return False
        base = f"{QUARANTINE_DIR}/{dirname}"
        reason = {"problem": problem, "quarantined_at": float(self.clock.time())}
        self.store.write_bytes(f"{base}/reason.json", json.dumps(reason, indent=1).encode())
        try:
            self.store.move(src, f"{base}/{MANIFEST}")
        except ObjectNotFoundError:
            return False
        if message is not None:
            log.warning(message)
            return True
        msg = (
            f"checkpoint {CKPT_DIR}/{dirname} is corrupt ({problem}); quarantined to {base}/, "
            "falling back to the previous valid checkpoint"
        )
        # One report: the log line (what the CLI shows). Library callers can still catch or
        # filter the warning; the CLI ignores it (colabjob.cli.quiet_warnings) so it is not
        # printed a second time as a raw ``warnings`` line.
        log.warning(msg)
        warnings.warn(msg, CorruptCheckpointWarning, stacklevel=4)
        return True
