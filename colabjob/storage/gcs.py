"""Google Cloud Storage stores (``gs://bucket/prefix``): gcsfs for bulk data,
google-cloud-storage for control objects with preconditions.

Bulk objects go through gcsfs with the code S3 shares (``bucket.BucketStore``): each GCS
upload is atomic on its own, so a bulk write is a single ``pipe``/``put``. Control objects
need what gcsfs does not offer: ``create`` uploads with ``if_generation_match=0`` and
``replace`` with ``if_generation_match=<generation>`` through google-cloud-storage's
``upload_from_string`` (a multipart upload: the emulator enforces preconditions only there).
The ``Version`` token is the object generation. ``STORAGE_EMULATOR_HOST`` is honoured
automatically: both clients then talk to the emulator anonymously (project ``test``) and
gcsfs's experimental HNS probe is switched off (against an emulator it hangs each bucket
probe for a minute). Both clients' own retries are kept out of the way where possible so
that ``colabjob.storage.retry`` decides.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from colabjob.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    PreconditionFailedError,
    UnsupportedURLError,
)
from colabjob.storage.bucket import BucketStore
from colabjob.storage.retry import RetryPolicy
from colabjob.storage.store import Store, Version, check_key, join_key

__all__ = ["GCSStore", "emulator_host"]

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def emulator_host() -> str | None:
    """The emulator endpoint from ``STORAGE_EMULATOR_HOST`` (with a scheme), or None."""
    host = os.environ.get(EMULATOR_ENV, "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


class _Clients:
    """Lazily built gcsfs filesystem and google-cloud-storage client, shared by children."""

    def __init__(self, *, project: str | None, token: Any) -> None:
        self._project = project
        self._token = token
        self._lock = threading.Lock()
        self._fs: Any = None
        self._gcs: Any = None

    @property
    def fs(self) -> Any:
        with self._lock:
            if self._fs is None:
                endpoint = emulator_host()
                if endpoint:
                    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
                    from gcsfs.core import GCSFileSystem

                    self._fs = GCSFileSystem(
                        token="anon",
                        endpoint_url=endpoint,
                        project=self._project or "test",
                        skip_instance_cache=True,
                        use_listings_cache=False,
                    )
                else:
                    import gcsfs

                    self._fs = gcsfs.GCSFileSystem(
                        token=self._token,
                        project=self._project,
                        skip_instance_cache=True,
                        use_listings_cache=False,
                    )
            return self._fs

    @property
    def gcs(self) -> Any:
        with self._lock:
            if self._gcs is None:
                from google.cloud import storage

                if emulator_host():
                    from google.auth.credentials import AnonymousCredentials

                    self._gcs = storage.Client(
                        project=self._project or "test", credentials=AnonymousCredentials()
                    )
                else:
                    self._gcs = storage.Client(project=self._project)
            return self._gcs


def _is_status(exc: BaseException, status: int) -> bool:
    return getattr(exc, "code", None) == status


class GCSStore(BucketStore[_Clients]):
    """A Store under ``gs://bucket/prefix``."""

    crc32c_supported = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        retry: RetryPolicy | None = None,
        project: str | None = None,
        token: Any = None,
        check_bucket: bool = True,
        _clients: _Clients | None = None,
    ) -> None:
        super().__init__(
            f"gs://{join_key(bucket, prefix)}",
            bucket,
            prefix,
            clients=_clients or _Clients(project=project, token=token),
            retry=retry,
            check_bucket=check_bucket,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        project: str | None = None,
        token: Any = None,
        check_bucket: bool = True,
    ) -> GCSStore:
        rest = url.split("://", 1)[1]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UnsupportedURLError(
                f"GCS URL without a bucket: {url!r}", hint="use gs://BUCKET[/prefix]"
            )
        return cls(
            bucket,
            prefix.strip("/"),
            retry=retry,
            project=project,
            token=token,
            check_bucket=check_bucket,
        )

    def _check_bucket(self) -> None:
        # Listing (storage.objects.list) rather than bucket.exists() (storage.buckets.get):
        # roles/storage.objectAdmin grants the first, not the second.
        blobs = self._clients.gcs.list_blobs(
            self._bucket,
            prefix=f"{self._prefix}/" if self._prefix else None,
            max_results=1,
            retry=None,
        )
        try:
            list(blobs)
        except Exception as e:
            if _is_status(e, 404):
                raise BucketNotFoundError(
                    f"GCS bucket gs://{self._bucket} does not exist",
                    hint="check the name, or create it: "
                    f"gcloud storage buckets create gs://{self._bucket}",
                ) from e
            raise

    def _child(self, prefix: str) -> Store:
        return GCSStore(
            self._bucket,
            self._name(prefix),
            retry=self.retry_policy,
            check_bucket=False,
            _clients=self._clients,
        )

    def crc32c(self, key: str) -> str | None:
        """The object's crc32c as GCS reports it (base64 of the big-endian checksum)."""
        k = check_key(key)
        return self._call(lambda: self._info(k).get("crc32c"), k)

    # ---- control objects (google-cloud-storage, preconditions) ---------------------------

    def _blob(self, key: str) -> Any:
        return self._clients.gcs.bucket(self._bucket).blob(self._name(key))

    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        blob = self._blob(key)
        try:
            data: bytes = blob.download_as_bytes(retry=None)
        except Exception as e:
            if _is_status(e, 404):
                return None
            raise
        if blob.generation is None:  # not every server echoes x-goog-generation
            blob.reload(retry=None)
        return data, Version(token=str(blob.generation))

    def _upload(self, key: str, data: bytes, generation: int) -> Version:
        blob = self._blob(key)
        blob.upload_from_string(
            data,
            content_type="application/octet-stream",
            if_generation_match=generation,
            retry=None,
        )
        return Version(token=str(blob.generation))

    def _create(self, key: str, data: bytes) -> Version:
        try:
            return self._upload(key, data, 0)
        except Exception as e:
            if _is_status(e, 412):
                raise AlreadyExistsError(f"{self.url_of(key)} already exists") from e
            raise

    def _replace(self, key: str, data: bytes, expected: Version) -> Version:
        try:
            generation = int(expected.token)
        except ValueError as e:
            raise PreconditionFailedError(
                f"{expected!r} is not a GCS generation (from another backend?)"
            ) from e
        try:
            return self._upload(key, data, generation)
        except Exception as e:
            if _is_status(e, 412) or _is_status(e, 404):
                raise PreconditionFailedError(
                    f"{self.url_of(key)} changed since generation {generation} "
                    "(compare-and-swap lost)"
                ) from e
            raise

