"""The one exception tree of colabjob.

Every error a user can meet is a ``ColabJobError``; its message says what happened and what
to do next. Lower-level exceptions are chained with ``raise ... from e``.

    ColabJobError
    ├── ConfigError                  bad job spec, flag or argument         (exit 2)
    ├── StorageError                 anything about durable storage
    │   ├── UnsupportedURLError      unknown scheme in a storage URL
    │   ├── DriveNotMountedError     /content/drive is not mounted
    │   ├── BucketNotFoundError      gs:// bucket missing or unreachable
    │   ├── StoragePermissionError   403 / read-only path
    │   ├── StorageFullError         disk full / quota exceeded
    │   ├── ObjectNotFoundError      a path that should exist does not
    │   ├── TransientStorageError    retried; raised only once retries are spent
    │   └── PreconditionFailedError  create-only / compare-and-swap lost the race
    │       └── AlreadyExistsError   create-only target already exists
    ├── CheckpointError
    │   ├── CorruptCheckpointError   size or hash mismatch, bad manifest
    │   ├── NoCheckpointError        no valid checkpoint to resume from
    │   ├── StaleEpochError          a newer runner owns the job (fencing)
    │   └── UnsafeCheckpointError    would need to unpickle arbitrary code
    ├── ResumeError
    │   └── GeometryChangedError     batch size / accumulation / world size changed
    ├── JobStateError
    │   └── InvalidTransitionError   illegal state-machine transition
    └── LeaseHeldError               another live runner holds the job       (exit 2)
        └── LeaseLostError           this runner's lease was taken over: stop now
"""

from __future__ import annotations


class ColabJobError(Exception):
    """Root of every colabjob error. ``hint`` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class ConfigError(ColabJobError):
    exit_code = 2


class StorageError(ColabJobError):
    pass


class UnsupportedURLError(StorageError, ConfigError):
    exit_code = 2


class DriveNotMountedError(StorageError):
    pass


class BucketNotFoundError(StorageError):
    pass


class StoragePermissionError(StorageError):
    pass


class StorageFullError(StorageError):
    pass


class ObjectNotFoundError(StorageError, FileNotFoundError):
    pass


class TransientStorageError(StorageError):
    pass


class PreconditionFailedError(StorageError):
    pass


class AlreadyExistsError(PreconditionFailedError, FileExistsError):
    pass


class CheckpointError(ColabJobError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


class NoCheckpointError(CheckpointError):
    pass


class StaleEpochError(CheckpointError):
    pass


class UnsafeCheckpointError(CheckpointError):
    pass


class ResumeError(ColabJobError):
    exit_code = 2


class GeometryChangedError(ResumeError):
    pass


class JobStateError(ColabJobError):
    pass


class InvalidTransitionError(JobStateError):
    pass


class LeaseHeldError(ColabJobError):
    exit_code = 2


class LeaseLostError(LeaseHeldError):
    """Our lease was taken over (or could not be renewed for its TTL): stop; commits are fenced."""
