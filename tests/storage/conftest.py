"""Fixtures for the storage suites: ``store_url`` / ``store`` are parametrized over every
backend (local, memory, GCS emulator, S3 emulator), so a test written once runs on all. The
Store contract itself is the mixin in ``contract.py``, subclassed per backend."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from colabjob.storage import Store, open_store
from colabjob.storage.retry import RetryPolicy

# contract.py is a plain module imported by the test modules: rewrite its asserts too.
pytest.register_assert_rewrite("tests.storage.contract")


def _url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "local":
        return str(tmp_path / "store")
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}"
    assert kind in ("gcs", "s3")
    return str(request.getfixturevalue(f"{kind}_bucket"))


@pytest.fixture(params=["local", "memory", "gcs", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh root URL on each backend."""
    return _url(request.param, request, tmp_path)


@pytest.fixture
def store(store_url: str, fast_retry: RetryPolicy) -> Store:
    """A fresh, empty Store on each backend (retries never wait)."""
    return open_store(store_url, retry=fast_retry)
