"""S3 and S3-compatible stores (``s3://bucket/prefix``: AWS, Cloudflare R2, Backblaze B2,
MinIO): s3fs for bulk data, conditional PUTs for control objects.

Bulk objects go through s3fs with the code GCS shares (``bucket.BucketStore``). Control
objects use S3's conditional writes on the same client: ``create`` is a ``PutObject`` with
``If-None-Match: *`` and ``replace`` one with ``If-Match: <ETag>``; the ``Version`` token is
the ETag. For a plain upload the ETag is the MD5 of the bytes, so a compare-and-swap
compares *content*, not writes (``versions_track_writes`` is False): rewriting identical
bytes is not a change. Control objects carry their owner and a counter, so for them the two
are the same.

Not every S3-compatible service honours the two headers; some accept and ignore them, which
would make a lease that every runner wins. Before its first ``create``/``replace`` a store
probes the service once (a throw-away object under the reserved ``.colabjob-`` prefix: a
second create-only PUT and a PUT with a wrong ETag must both fail with 412) and, if the
preconditions are not enforced, refuses the lease and record operations with
``UnsupportedURLError`` instead of pretending. Read-only use still works there.

The endpoint comes from the URL (``s3://bucket/prefix?endpoint_url=https://HOST``), else from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials and region from the usual AWS
chain (environment, ``AWS_PROFILE``, ``~/.aws``). A URL's option stays in ``url`` (child URLs
put their keys before it), so a child process reopens the same store. Both s3fs's and
botocore's own retries are switched off so that ``colabjob.storage.retry`` decides.
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
from contextlib import suppress
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from colabjob.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    PreconditionFailedError,
    TransientStorageError,
    UnsupportedURLError,
)
from colabjob.storage.bucket import BucketStore
from colabjob.storage.retry import RetryPolicy
from colabjob.storage.store import RESERVED_PREFIX, Store, Version, join_key

__all__ = ["S3Store", "endpoint_from_env"]

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
URL_OPTIONS = ("endpoint_url",)
# An ETag no object has (a real one is 32 hex digits, or that plus "-<parts>").
_NO_SUCH_ETAG = '"colabjob-probe-no-such-etag"'
NO_CONDITIONAL_WRITES_HINT = (
    "use a service that enforces S3 conditional writes (AWS S3, Cloudflare R2, Backblaze B2, "
    "MinIO) or another store (gs://, a local path, Drive); read-only commands still work here"
)


def endpoint_from_env() -> str | None:
    """The S3 endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, or None (AWS)."""
    for name in ENDPOINT_ENVS:
        if value := os.environ.get(name, "").strip():
            return value.rstrip("/")
    return None


def _error_of(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, S3 error code) of a botocore ClientError, or of the OSError s3fs
    made of one (s3fs keeps the ClientError as ``__cause__``)."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(response.get("Error", {}).get("Code", ""))
            return (status if isinstance(status, int) else None), code
    return None, ""


@functools.cache
def _model_loader() -> Any:
    """botocore's loader of the (static) API models, shared by every session of this
    process: each new session would parse the S3 model again (~0.3 s per store opened)."""
    from botocore.loaders import create_loader

    return create_loader()


class _Clients:
    """The lazily built s3fs filesystem, and whether the service enforces conditional
    writes (probed once), shared by a store and its children."""

    def __init__(self, *, endpoint: str | None) -> None:
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._fs: Any = None
        self.conditional_writes: bool | None = None  # None: not probed yet

    @property
    def fs(self) -> Any:
        with self._lock:
            if self._fs is None:
                import s3fs
                from aiobotocore.session import AioSession

                session = AioSession()
                session.register_component("data_loader", _model_loader())
                self._fs = s3fs.S3FileSystem(
                    session=session,
                    endpoint_url=self.endpoint,
                    skip_instance_cache=True,
                    use_listings_cache=False,
                    config_kwargs={"retries": {"total_max_attempts": 1}},
                )
                self._fs.retries = 1  # s3fs's own retry loop: one attempt, we retry
            return self._fs

    def call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        out: dict[str, Any] = self.fs.call_s3(method, **kwargs)
        return out

    def get(self, bucket: str, name: str) -> tuple[bytes, str]:
        """The object's bytes and ETag, from one GET (so they belong together)."""
        from fsspec.asyn import sync

        fs = self.fs

        async def read() -> tuple[bytes, str]:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=name)
            try:
                data: bytes = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return data, str(resp["ETag"])

        result: tuple[bytes, str] = sync(fs.loop, read)
        return result


class S3Store(BucketStore[_Clients]):
    """A Store under ``s3://bucket/prefix`` (an endpoint URL for S3-compatible services)."""

    versions_track_writes = False

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        retry: RetryPolicy | None = None,
        check_bucket: bool = True,
        _clients: _Clients | None = None,
    ) -> None:
        endpoint = endpoint_url.rstrip("/") if endpoint_url else None
        self._query = f"?{urlencode({'endpoint_url': endpoint}, safe=':/')}" if endpoint else ""
        super().__init__(
            f"s3://{join_key(bucket, prefix)}{self._query}",
            bucket,
            prefix,
            clients=_clients or _Clients(endpoint=endpoint or endpoint_from_env()),
            retry=retry,
            check_bucket=check_bucket,
        )

    @classmethod
    def from_url(
        cls, url: str, *, retry: RetryPolicy | None = None, check_bucket: bool = True
    ) -> S3Store:
        parts = urlsplit(url)
        options = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(options) - set(URL_OPTIONS))
        if unknown or any(len(v) != 1 or not v[0] for v in options.values()):
            raise UnsupportedURLError(
                f"S3 URL {url!r} has unknown or empty options {unknown or sorted(options)}",
                hint="the one option is endpoint_url: s3://BUCKET/PATH?endpoint_url=https://HOST",
            )
        bucket = parts.netloc
        if not bucket or "@" in bucket:
            raise UnsupportedURLError(
                f"S3 URL without a bucket: {url!r}", hint="use s3://BUCKET[/prefix]"
            )
        endpoint = options["endpoint_url"][0] if options else None
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise UnsupportedURLError(
                f"endpoint_url {endpoint!r} in {url!r} is not an http(s) URL",
                hint="e.g. ?endpoint_url=https://ACCOUNT_ID.r2.cloudflarestorage.com",
            )
        return cls(
            bucket,
            parts.path.strip("/"),
            endpoint_url=endpoint,
            retry=retry,
            check_bucket=check_bucket,
        )

    def url_of(self, key: str) -> str:
        """The URL of ``key``: the key goes before the URL's options."""
        return f"s3://{join_key(self._bucket, self._name(key))}{self._query}"

    def _check_bucket(self) -> None:
        # Listing (s3:ListBucket) rather than HeadBucket: the first is what the store needs.
        try:
            self._clients.call(
                "list_objects_v2",
                Bucket=self._bucket,
                Prefix=f"{self._prefix}/" if self._prefix else "",
                MaxKeys=1,
            )
        except Exception as e:
            status, code = _error_of(e)
            if code == "NoSuchBucket" or (status == 404 and not code):
                where = f" at {self._clients.endpoint}" if self._clients.endpoint else ""
                raise BucketNotFoundError(
                    f"S3 bucket s3://{self._bucket} does not exist{where}",
                    hint="check the name and the endpoint, or create it: "
                    f"aws s3 mb s3://{self._bucket} (R2/B2/MinIO: the service's console)",
                ) from e
            raise

    def _child(self, prefix: str) -> Store:
        return S3Store(
            self._bucket,
            self._name(prefix),
            endpoint_url=self._clients.endpoint if self._query else None,
            retry=self.retry_policy,
            check_bucket=False,
            _clients=self._clients,
        )

    # ---- control objects (conditional PUTs) -----------------------------------------------

    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        try:
            data, etag = self._clients.get(self._bucket, self._name(key))
        except Exception as e:
            status, code = _error_of(e)
            if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                return None
            raise
        return data, Version(token=etag)

    def _put(self, key: str, data: bytes, **condition: str) -> Version:
        out = self._clients.call(
            "put_object", Bucket=self._bucket, Key=self._name(key), Body=data, **condition
        )
        return Version(token=str(out["ETag"]))

    def _create(self, key: str, data: bytes) -> Version:
        self._require_conditional_writes()
        try:
            return self._put(key, data, IfNoneMatch="*")
        except Exception as e:
            status, _ = _error_of(e)
            if status == 412:
                raise AlreadyExistsError(f"{self.url_of(key)} already exists") from e
            _raise_if_conflict(e, self.url_of(key))
            raise

    def _replace(self, key: str, data: bytes, expected: Version) -> Version:
        self._require_conditional_writes()
        try:
            return self._put(key, data, IfMatch=expected.token)
        except Exception as e:
            status, _ = _error_of(e)
            if status in (404, 412):
                raise PreconditionFailedError(
                    f"{self.url_of(key)} changed since ETag {expected.token} "
                    "(compare-and-swap lost)"
                ) from e
            _raise_if_conflict(e, self.url_of(key))
            raise

    def _require_conditional_writes(self) -> None:
        clients = self._clients
        if clients.conditional_writes is None:
            clients.conditional_writes = self._probe_conditional_writes()
        if not clients.conditional_writes:
            where = clients.endpoint or "AWS S3"
            raise UnsupportedURLError(
                f"{self.url}: the S3 service at {where} does not enforce conditional writes "
                "(If-None-Match / If-Match); colabjob's lease, job record and checkpoint "
                "commits need them, so it refuses to run a job here",
                hint=NO_CONDITIONAL_WRITES_HINT,
            )

    def _probe_conditional_writes(self) -> bool:
        """Whether the service refuses (412) a second create-only PUT and a PUT with a wrong
        ETag. Some services ignore the headers (the PUT succeeds), some answer 501."""
        name = self._name(f"{RESERVED_PREFIX}probe-{uuid.uuid4().hex}")
        attempts = ({"IfNoneMatch": "*"}, {"IfNoneMatch": "*"}, {"IfMatch": _NO_SUCH_ETAG})
        try:
            for i, condition in enumerate(attempts):
                try:
                    self._clients.call(
                        "put_object", Bucket=self._bucket, Key=name, Body=b"probe", **condition
                    )
                except Exception as e:
                    status, code = _error_of(e)
                    if status == 501 or code == "NotImplemented":
                        return False
                    if status != 412 or i == 0:
                        raise
                    continue
                if i > 0:
                    return False  # the precondition should have failed: it was ignored
            return True
        finally:
            # A leftover probe object is harmless (reserved name); its error must not hide
            # the probe's own outcome.
            with suppress(Exception):
                self._clients.call("delete_object", Bucket=self._bucket, Key=name)


def _raise_if_conflict(exc: BaseException, where: str) -> None:
    """S3 answers 409 ConditionalRequestConflict when conditional writes to one key overlap,
    and asks the client to retry: make it a transient error for the retry policy."""
    status, code = _error_of(exc)
    if status == 409 or code == "ConditionalRequestConflict":
        raise TransientStorageError(
            f"conditional write to {where} overlapped another one (409); retrying"
        ) from exc
