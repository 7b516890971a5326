"""Which checkpoint a segment resumes from, and what becomes of the others.

By default the newest checkpoint whose every byte verifies (``CheckpointStore.fetch_latest``).
A ``ResumeChoice`` asks for one by hand (``--from-step N`` / ``--checkpoint ID``) or for none
(``--from-scratch``). Checkpoints are never deleted here: one that fails to load is
quarantined like a corrupt one (``set_aside_unloadable``), and checkpoints newer than a
chosen one, or every checkpoint before a deliberate fresh start, are *set aside*
(quarantined with the reason ``superseded``) so a later plain ``resume`` can never jump back
to the abandoned line of training; their files stay under ``ckpt/`` and their manifests
under ``quarantine/``. ``nothing_left`` is the error for a job whose record shows committed
progress but has no valid checkpoint left: it never silently starts over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from colabjob.errors import ConfigError, NoCheckpointError

from .manifest import QUARANTINE_DIR, CheckpointInfo

if TYPE_CHECKING:
    from .checkpoints import CheckpointStore

__all__ = [
    "ResumeChoice",
    "check_resume_point",
    "fetch_choice",
    "find_checkpoint",
    "nothing_left",
    "quarantined_ids",
    "set_aside_all",
    "set_aside_unloadable",
    "supersede",
]


@dataclass(frozen=True, kw_only=True)
class ResumeChoice:
    """What to resume from: ``step`` or ``checkpoint`` (an id: the directory name
    ``<step:012d>-<uid>`` or its uid) picks one by hand; ``scratch`` starts over at step 0
    on purpose. All unset: the newest valid checkpoint."""

    step: int | None = None
    checkpoint: str | None = None
    scratch: bool = False

    def __post_init__(self) -> None:
        given = sum((self.step is not None, self.checkpoint is not None, self.scratch))
        if given > 1:
            raise ConfigError(
                "--from-step, --checkpoint and --from-scratch exclude each other; pass one"
            )
        if self.step is not None and self.step < 0:
            raise ConfigError(f"--from-step must be >= 0, got {self.step}")

    @property
    def explicit(self) -> bool:
        """A checkpoint was chosen by hand."""
        return self.step is not None or self.checkpoint is not None

    def describe(self) -> str:
        if self.step is not None:
            return f"--from-step {self.step}"
        if self.checkpoint is not None:
            return f"--checkpoint {self.checkpoint}"
        return "--from-scratch" if self.scratch else "the newest checkpoint"


def _matches(info: CheckpointInfo, choice: ResumeChoice) -> bool:
    if choice.step is not None:
        return info.step == choice.step
    ident = str(choice.checkpoint).strip("/")
    return ident in (info.dirname, info.uid, info.prefix)


def find_checkpoint(ckpts: CheckpointStore, choice: ResumeChoice) -> CheckpointInfo:
    """The committed checkpoint ``choice`` names (the newest of a step); ``ConfigError``
    (exit 2) listing the available ones if there is none."""
    infos = ckpts.list()
    found = [i for i in infos if _matches(i, choice)]
    if found:
        return found[-1]
    have = ", ".join(f"step {i.step} ({i.dirname})" for i in infos) or "none"
    raise ConfigError(
        f"{choice.describe()}: no such committed checkpoint in {ckpts.store.url}",
        hint=f"available: {have}",
    )


def fetch_choice(
    ckpts: CheckpointStore, local_dir: str | os.PathLike[str], choice: ResumeChoice | None
) -> CheckpointInfo | None:
    """Download the checkpoint to resume from into ``local_dir``: the chosen one (a corrupt
    one is quarantined and raises ``CorruptCheckpointError``: nothing else is tried), none
    for ``scratch``, else the newest one that verifies (falling back past corrupt ones)."""
    if choice is not None and choice.scratch:
        return None
    if choice is None or not choice.explicit:
        return ckpts.fetch_latest(local_dir)
    info = find_checkpoint(ckpts, choice)
    ckpts.fetch(info, local_dir)
    return info


def set_aside_unloadable(ckpts: CheckpointStore, info: CheckpointInfo, error: Exception) -> None:
    """Quarantine a checkpoint whose bytes verify but do not load (content the loader
    refuses: not a changed model or config); one warning says so."""
    first = str(error.args[0]) if error.args else type(error).__name__
    ckpts.catalog.quarantine(info.dirname, f"does not load: {first}")


def supersede(
    ckpts: CheckpointStore, kept: CheckpointInfo | None, why: str
) -> list[CheckpointInfo]:
    """Set aside every committed checkpoint newer than ``kept`` (all of them for None):
    quarantined with ``why``, files untouched. Returns them."""
    newer = [i for i in ckpts.list() if kept is None or i.order() > kept.order()]
    for info in newer:
        ckpts.catalog.quarantine(
            info.dirname,
            f"superseded: {why}",
            message=f"checkpoint step {info.step} ({info.dirname}) set aside ({why}); "
            f"its manifest is under {QUARANTINE_DIR}/{info.dirname}/, its files are kept",
        )
    return newer


def check_resume_point(
    ckpts: CheckpointStore, committed_step: int, choice: ResumeChoice | None
) -> None:
    """Before a segment begins (``job.json`` untouched): a chosen checkpoint must exist
    (``ConfigError`` listing the others); without a choice, a record that shows committed
    progress (``committed_step``) needs a checkpoint that still verifies (sizes: bit-level
    damage is caught on download), else ``NoCheckpointError`` and nothing is retrained.
    Corrupt checkpoints met on the way are quarantined, as any reader does."""
    if choice is not None and choice.explicit:
        find_checkpoint(ckpts, choice)
    elif (choice is None or not choice.scratch) and committed_step > 0 and ckpts.latest() is None:
        raise nothing_left(str(ckpts.store.url), committed_step, quarantined_ids(ckpts))


def set_aside_all(ckpts: CheckpointStore) -> list[CheckpointInfo]:
    """``--from-scratch``: set every committed checkpoint aside (under the lease)."""
    return supersede(ckpts, None, "started over with --from-scratch")


def quarantined_ids(ckpts: CheckpointStore) -> list[str]:
    return sorted(ckpts.catalog.quarantined())


def nothing_left(url: str, committed_step: int, quarantined: list[str]) -> NoCheckpointError:
    """The refusal when the record shows committed progress but no checkpoint is left."""
    held = f"quarantined: {', '.join(quarantined)}" if quarantined else "none is quarantined"
    return NoCheckpointError(
        f"job.json records committed progress up to step {committed_step}, but no valid "
        f"checkpoint is left in {url} ({held}); refusing to start over silently",
        hint="inspect quarantine/<id>/reason.json; to train again from step 0 on purpose "
        f"(the quarantined checkpoints are kept): colabjob resume {url} --from-scratch",
    )
