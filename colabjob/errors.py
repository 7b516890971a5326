"""The one exception tree of colabjob.

Every error a user can meet is a ``ColabJobError``; its message says what happened and what
to do next. Lower-level exceptions are chained with ``raise ... from e``.

    ColabJobError
    ├── ConfigError                  bad job spec, flag or argument         (exit 2)
    │   └── UnsupportedTransformersError  transformers lacks the Trainer internals we
    │                                     override (version outside the supported range)
    ├── StorageError                 anything about durable storage
    │   ├── UnsupportedURLError      unknown scheme in a storage URL, or a store that
    │   │                            cannot hold a job (S3 without conditional writes)
    │   ├── DriveNotMountedError     /content/drive is not mounted
    │   ├── BucketNotFoundError      gs:// or s3:// bucket missing or unreachable
    │   ├── StoragePermissionError   403 / read-only path
    │   │   └── CredentialsError     no or unusable cloud credentials           (exit 2)
    │   ├── StorageFullError         disk full / quota exceeded
    │   ├── ObjectNotFoundError      a path that should exist does not
    │   ├── InvalidLeaseError        control/lease.json is damaged          (exit 2)
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
    │   ├── InvalidTransitionError   illegal state-machine transition
    │   └── JobMovedError            the job was handed off; run it at its new URL (exit 2)
    ├── HandoffError                 moving a job to a GCP VM failed (VM not created)
    │   ├── GcloudError              gcloud missing, not authenticated or unusable (exit 2)
    │   └── KaggleNotFoundError      Kaggle's CLI (`kaggle`) is not installed       (exit 2)
    └── LeaseHeldError               another live runner holds the job       (exit 2)
        ├── LeaseLostError           this runner's lease was taken over: stop now
        │   └── StorageLostError     the job's storage (lease, job.json) vanished (exit 1;
        │                            also a StorageError)
        └── JobNotPausedError        a live runner holds the job: pause it before a handoff

``ExitCode`` is the one set of process exit codes; every error carries one (``exit_code``).
"""

from __future__ import annotations

import enum

__all__ = [
    "AlreadyExistsError",
    "BucketNotFoundError",
    "CheckpointError",
    "ColabJobError",
    "ConfigError",
    "CorruptCheckpointError",
    "CredentialsError",
    "DriveNotMountedError",
    "ExitCode",
    "GcloudError",
    "GeometryChangedError",
    "HandoffError",
    "InvalidLeaseError",
    "InvalidTransitionError",
    "JobMovedError",
    "JobNotPausedError",
    "JobStateError",
    "KaggleNotFoundError",
    "LeaseHeldError",
    "LeaseLostError",
    "NoCheckpointError",
    "ObjectNotFoundError",
    "PreconditionFailedError",
    "ResumeError",
    "SkyNotFoundError",
    "StaleEpochError",
    "StorageError",
    "StorageFullError",
    "StorageLostError",
    "StoragePermissionError",
    "TransientStorageError",
    "UnsafeCheckpointError",
    "UnsupportedTransformersError",
    "UnsupportedURLError",
]


class ExitCode(enum.IntEnum):
    """How every colabjob command, script and child process exits."""

    DONE = 0  # the job completed, or the command did what was asked
    FAILED = 1  # a crash, retries exhausted, storage refused
    USAGE = 2  # bad usage or config: one line says what to do; nothing was changed
    PAUSED = 75  # stopped at a committed checkpoint: resume in the next session (EX_TEMPFAIL)


class ColabJobError(Exception):
    """Root of every colabjob error. ``hint`` says what to do about it."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class ConfigError(ColabJobError):
    exit_code = ExitCode.USAGE


class UnsupportedTransformersError(ConfigError):
    """The installed transformers lacks Trainer internals the HF integration overrides."""


class StorageError(ColabJobError):
    pass


class UnsupportedURLError(StorageError, ConfigError):
    exit_code = ExitCode.USAGE


class DriveNotMountedError(StorageError):
    pass


class BucketNotFoundError(StorageError):
    pass


class StoragePermissionError(StorageError):
    pass


class CredentialsError(StoragePermissionError, ConfigError):
    """No cloud credentials (Application Default Credentials) or an unusable credentials
    file: the user must authenticate, not retry."""

    exit_code = ExitCode.USAGE


class StorageFullError(StorageError):
    pass


class ObjectNotFoundError(StorageError, FileNotFoundError):
    pass


class InvalidLeaseError(StorageError):
    """``control/lease.json`` cannot be parsed or holds values out of bounds."""

    exit_code = ExitCode.USAGE


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
    exit_code = ExitCode.USAGE


class GeometryChangedError(ResumeError):
    pass


class JobStateError(ColabJobError):
    pass


class InvalidTransitionError(JobStateError):
    pass


class JobMovedError(JobStateError):
    """The job was handed off (``control/moved.json``); ``moved_to`` is its new URL."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, moved_to: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.moved_to = moved_to


class HandoffError(ColabJobError):
    pass


class GcloudError(HandoffError):
    exit_code = ExitCode.USAGE


class SkyNotFoundError(HandoffError):
    """The SkyPilot CLI (``sky``) is not installed: ``--engine skypilot`` needs it."""

    exit_code = ExitCode.USAGE


class KaggleNotFoundError(HandoffError):
    """Kaggle's CLI (``kaggle``) is not installed: ``colabjob kaggle push`` needs it."""

    exit_code = ExitCode.USAGE


class LeaseHeldError(ColabJobError):
    exit_code = ExitCode.USAGE


class LeaseLostError(LeaseHeldError):
    """Our lease was taken over (or could not be renewed for its TTL): stop; commits are fenced."""


class StorageLostError(LeaseLostError, StorageError):
    """The lease or ``job.json`` vanished while this runner held the job (the job's directory
    was deleted): stop committing; nothing more may be written there."""

    exit_code = ExitCode.FAILED


class JobNotPausedError(LeaseHeldError):
    """A handoff found a live runner: the job must be paused (stopped cleanly) first."""
