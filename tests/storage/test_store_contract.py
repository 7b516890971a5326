"""The Store contract (``tests/storage/contract.py``) run on the local, memory, GCS-emulator and
S3-emulator backends; ``test_drive.py`` runs it on the Drive store."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.storage.contract import SharedStoreContract, StoreContract


class TestLocalStore(SharedStoreContract):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return str(tmp_path / "store")


class TestMemoryStore(StoreContract):
    """In-process only: separate interpreters never share a memory:// store."""

    @pytest.fixture
    def store_url(self) -> str:
        return f"memory://{uuid.uuid4().hex}"


@pytest.mark.gcs
class TestGcsStore(SharedStoreContract):
    @pytest.fixture
    def store_url(self, gcs_bucket: str) -> str:
        return gcs_bucket


@pytest.mark.s3
class TestS3Store(SharedStoreContract):
    @pytest.fixture
    def store_url(self, s3_bucket: str) -> str:
        return s3_bucket
