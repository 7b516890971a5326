"""When failing periodic checkpoints stop the run: ``MAX_FAILED_CHECKPOINTS`` in a row.

A periodic checkpoint that fails is retried at the next boundary (``Committer.reap``, the one
committer of the Session API and the HF Trainer). A few failures in a row mean the storage
itself is failing (disk full, read-only, unreachable): training on would only pile up work that
is never saved, and the lease would stay held by a run that cannot commit. ``CommitFailures``
counts them and, at the limit, raises a ``StorageError`` saying so and since which step the work
is unsaved; the segment then ends as failed (exit 1) and releases its lease. A lost lease or
storage (``LeaseLostError``, ``StaleEpochError``) is never retried: it is raised at once.
"""

from __future__ import annotations

from colabjob.errors import LeaseLostError, StaleEpochError, StorageError

__all__ = ["MAX_FAILED_CHECKPOINTS", "CommitFailures"]

MAX_FAILED_CHECKPOINTS = 3


class CommitFailures:
    """Consecutive failed periodic checkpoints of one segment."""

    def __init__(self, limit: int = MAX_FAILED_CHECKPOINTS) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.count = 0

    def succeeded(self) -> None:
        self.count = 0

    def failed(self, error: BaseException, *, step: int, saved_step: int | None, url: str) -> None:
        """Count a failed checkpoint of ``step``; raise when it must not be retried."""
        if isinstance(error, (StaleEpochError, LeaseLostError)):
            raise error
        self.count += 1
        if self.count < self.limit:
            return
        saved = saved_step or 0
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StorageError(
            f"{self.count} checkpoints in a row failed (the last, step {step}: {first}): the "
            f"storage at {url} is failing (disk full, read-only or unreachable); training "
            f"stopped, the work since step {saved} was not saved",
            hint="free space or fix access to the storage, then resume (`colabjob resume "
            f"{url}`, or run the script again): it continues from step {saved}",
        ) from error
