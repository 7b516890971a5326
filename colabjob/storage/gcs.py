"""Google Cloud Storage stores (``gs://bucket/prefix``): gcsfs for bulk data,
google-cloud-storage for control objects with preconditions.

Each GCS upload is atomic on its own (an object appears whole or not at all), so bulk
writes are a single ``pipe``/``put`` through gcsfs. Control objects need what gcsfs does not
offer: ``create`` uploads with ``if_generation_match=0`` and ``replace`` with
``if_generation_match=<generation>`` through google-cloud-storage's ``upload_from_string``
(a multipart upload: the emulator enforces preconditions only there). The ``Version`` token
is the object generation. Listings bypass gcsfs's directory cache, because other processes
write too. ``STORAGE_EMULATOR_HOST`` is honoured automatically: both clients then talk to the
emulator anonymously (project ``test``) and gcsfs's experimental HNS probe is switched off
(against an emulator it hangs each bucket probe for a minute). Both clients' own retries
are kept out of the way where possible so that ``colabjob.storage.retry`` decides.
"""

from __future__ import annotations

import os
import threading
from contextlib import suppress
from typing import Any

from colabjob.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    PreconditionFailedError,
    UnsupportedURLError,
)
from colabjob.storage.local import atomic_local_fetch
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


class GCSStore(Store):
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
        super().__init__(f"gs://{join_key(bucket, prefix)}", retry=retry)
        self._bucket = bucket
        self._prefix = prefix
        self._clients = _clients or _Clients(project=project, token=token)
        if check_bucket:
            self._call(self._check_bucket)

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

    def _name(self, key: str) -> str:
        """Object name inside the bucket."""
        return join_key(self._prefix, key)

    def _path(self, key: str) -> str:
        """gcsfs path: bucket/object-name."""
        return join_key(self._bucket, self._name(key))

    def _rel(self, path: str) -> str:
        root = self._path("") + "/"
        return path[len(root) :] if path.startswith(root) else path

    # ---- bulk objects (gcsfs) ------------------------------------------------------------

    def _read_bytes(self, key: str) -> bytes:
        data: bytes = self._clients.fs.cat_file(self._path(key))
        return data

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._clients.fs.pipe_file(self._path(key), data)

    def _put_file(self, local_path: str, key: str) -> None:
        self._clients.fs.put_file(local_path, self._path(key))

    def _get_file(self, key: str, local_path: str) -> None:
        fs = self._clients.fs
        atomic_local_fetch(local_path, lambda tmp: fs.get_file(self._path(key), tmp))

    def _info(self, key: str) -> dict[str, Any]:
        info: dict[str, Any] = self._clients.fs.info(self._path(key))
        if info.get("type") != "file":
            raise FileNotFoundError(self.url_of(key))
        return info

    def _exists(self, key: str) -> bool:
        try:
            self._info(key)
        except FileNotFoundError:
            return False
        return True

    def _size(self, key: str) -> int:
        return int(self._info(key)["size"])

    def crc32c(self, key: str) -> str | None:
        """The object's crc32c as GCS reports it (base64 of the big-endian checksum)."""
        k = check_key(key)
        return self._call(lambda: self._info(k).get("crc32c"), k)

    def _list(self, prefix: str) -> list[str]:
        try:
            paths = self._clients.fs.find(self._path(prefix), withdirs=False)
        except FileNotFoundError:
            return []
        return [self._rel(p) for p in paths]

    def _list_dirs(self, prefix: str) -> list[str]:
        try:
            entries = self._clients.fs.ls(self._path(prefix), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return [
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
        ]

    def _delete(self, key: str) -> None:
        with suppress(FileNotFoundError):
            self._clients.fs.rm_file(self._path(key))

    def _delete_prefix(self, prefix: str) -> None:
        under = prefix + "/" if prefix else ""
        for key in self._list(prefix):
            if key.startswith(under):
                self._delete(key)

    def _move(self, src: str, dst: str) -> None:
        fs = self._clients.fs
        fs.copy(self._path(src), self._path(dst))
        self._delete(src)

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

    def _flush(self) -> None:
        pass  # an upload is durable once it returns
