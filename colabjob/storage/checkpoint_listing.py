"""The read side of ``CheckpointStore``: the committed checkpoints listed, the newest valid
one (corrupt newer ones quarantined), verified reads and fetches, all through
``catalog.Catalog``; and the housekeeping that runs after a commit: retention (the newest
``keep`` valid checkpoints stay, older ones go manifest first) and sweeping orphan prefixes.
``CheckpointListing`` is the base class that owns them; ``checkpoints.CheckpointStore`` adds
the save path and sets the attributes declared here.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import TYPE_CHECKING

from colabjob.errors import CorruptCheckpointError

from .manifest import CKPT_DIR, MANIFEST, CheckpointInfo, parse_dir

if TYPE_CHECKING:
    from .catalog import Catalog, Verify
    from .store import Store


class CheckpointListing:
    """Listing, selection and retention of one job's checkpoints (see the module)."""

    store: Store
    keep: int
    catalog: Catalog
    _inflight: set[str]

    # ---- reading (see catalog.py) -------------------------------------------------------

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints (manifest present and readable), oldest first."""
        return self.catalog.list()

    def latest(self, *, verify: Verify = "size") -> CheckpointInfo | None:
        """The newest checkpoint that passes ``verify``; corrupt newer ones are quarantined
        with a ``CorruptCheckpointWarning``.

        ``"size"`` checks every file is present with its size (cheap); ``"full"`` also
        hashes every byte; ``"none"`` only parses the manifest. ``read``/``fetch`` always
        check sha256.
        """
        return self.catalog.latest(verify)

    def read(self, info: CheckpointInfo, name: str) -> bytes:
        """One file's bytes, verified (size + sha256); ``CorruptCheckpointError`` otherwise
        (and the checkpoint is quarantined)."""
        return self.catalog.read(info, name)

    def fetch(self, info: CheckpointInfo, local_dir: str | os.PathLike[str]) -> Path:
        """Download every file into ``local_dir``: each lands under a temp name, is verified
        and only then renamed into place. ``CorruptCheckpointError`` (and quarantine) if any
        file is bad, in which case no file of it is placed."""
        return self.catalog.fetch(info, local_dir)

    def fetch_latest(self, local_dir: str | os.PathLike[str]) -> CheckpointInfo | None:
        """``fetch`` the newest checkpoint whose every byte verifies, falling back past (and
        quarantining) bad ones; None if there is none."""
        while (info := self.latest()) is not None:
            try:
                self.fetch(info, local_dir)
            except CorruptCheckpointError:
                continue
            return info
        return None

    # ---- housekeeping -------------------------------------------------------------------

    def apply_retention(self, *, protect: str | None = None) -> builtins.list[CheckpointInfo]:
        """Keep the newest ``keep`` valid checkpoints; delete older ones, manifest first.

        Nothing is deleted until ``keep`` newer ones verified (sizes), so a corrupt newest
        checkpoint never costs an older good one. ``protect`` (a prefix) is never deleted.
        Returns the deleted checkpoints.
        """
        kept = 0
        deleted: builtins.list[CheckpointInfo] = []
        for info in reversed(self.list()):
            if kept < self.keep:
                problem = self.catalog.verify(info, "size")
                if problem is None:
                    kept += 1
                else:
                    self.catalog.quarantine(info.dirname, problem)
            elif info.prefix != protect:
                self.store.delete(info.key(MANIFEST))
                self.store.delete_prefix(info.prefix)
                deleted.append(info)
        return deleted

    def sweep_staging(self, *, include_newer: bool = False) -> builtins.list[str]:
        """Delete orphan prefixes (no manifest, not quarantined, not being written here).

        An orphan at or below the newest committed step was abandoned (a crash, a fenced-out
        writer, a failed save); one above it may still be in flight elsewhere and is swept
        only with ``include_newer`` (when no runner is live). Returns the swept prefixes.
        """
        groups = self.catalog.groups()
        steps = {d: parse_dir(d)[0] for d in groups}  # type: ignore[index]
        newest = max((steps[d] for d, names in groups.items() if MANIFEST in names), default=None)
        quarantined = self.catalog.quarantined()
        swept: builtins.list[str] = []
        for dirname, names in sorted(groups.items()):
            prefix = f"{CKPT_DIR}/{dirname}"
            if MANIFEST in names or dirname in quarantined or prefix in self._inflight:
                continue
            if include_newer or (newest is not None and steps[dirname] <= newest):
                self.store.delete_prefix(prefix)
                swept.append(prefix)
        return swept
