"""The one place where storage errors are classified, retried and translated.

Every ``Store`` operation runs through ``RetryPolicy.call``. An error is *transient* (HTTP
408/429/5xx, timeouts, connection resets, Drive's FUSE dropping out with errno 107
"Transport endpoint is not connected", EIO) or *permanent*. Transient errors are retried
with tenacity (exponential backoff with jitter, a bounded number of attempts, an injectable
``sleep`` so tests never wait); once the attempts are spent they surface as
``TransientStorageError``. Permanent errors surface at once, translated into the
``colabjob.errors`` tree with a hint saying what to do: 403/EACCES/EROFS →
``StoragePermissionError``, a missing bucket → ``BucketNotFoundError``, quota/ENOSPC →
``StorageFullError``, 404/ENOENT → ``ObjectNotFoundError``. Backend exceptions are
recognised by duck typing (``.code``, botocore's ``response`` dict, class names), so nothing
here imports a backend; s3fs's OSErrors are judged by the botocore error they were made of.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, ParamSpec, TypeVar, overload

import tenacity

from colabjob.errors import (
    BucketNotFoundError,
    ColabJobError,
    CredentialsError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StorageFullError,
    StoragePermissionError,
    TransientStorageError,
)

__all__ = [
    "DEFAULT_POLICY",
    "RetryPolicy",
    "classify",
    "credentials_error",
    "retrying",
    "transient_retry",
    "translate",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

Kind = Literal["transient", "permanent"]

TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOTCONN,  # 107: Drive's FUSE mount dropped ("Transport endpoint is not connected")
        errno.EIO,  # FUSE / network filesystems report upstream hiccups as EIO
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.EAGAIN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ESTALE,
        errno.EINTR,
    }
)
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_BUCKET_MISSING = re.compile(
    r"no such bucket|bucket[^/]* (does not exist|not found)|specified bucket|bucketnotfound"
)
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
# Exception class names (anywhere in the MRO) of network libraries that mean "try again":
# requests/urllib3 (google-cloud-storage), aiohttp (gcsfs), google-auth.
TRANSIENT_CLASS_NAMES = frozenset(
    {
        "ConnectionError",
        "Timeout",
        "ReadTimeout",
        "ConnectTimeout",
        "ReadTimeoutError",
        "ChunkedEncodingError",
        "ProtocolError",
        "IncompleteRead",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "TransportError",
    }
)


# google-auth: no Application Default Credentials, or a credentials file it cannot use;
# botocore (S3): no credentials found, or half of a key pair.
CREDENTIALS_CLASS_NAMES = frozenset(
    {"DefaultCredentialsError", "RefreshError", "NoCredentialsError", "PartialCredentialsError"}
)
CREDENTIALS_HINT = (
    "authenticate this machine: in Colab run `from google.colab import auth; "
    "auth.authenticate_user()`; elsewhere `gcloud auth application-default login`, or set "
    "GOOGLE_APPLICATION_CREDENTIALS to a valid service-account JSON key file"
)
AWS_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (R2, B2, MinIO: the service's S3 key "
    "pair), or AWS_PROFILE to a profile in ~/.aws/credentials"
)


def credentials_error(exc: BaseException, *, where: str = "") -> CredentialsError:
    """The colabjob error for "no or unusable credentials" (google-auth, botocore; exit 2)."""
    first = exc.args[0] if exc.args else ""
    text = str(first if isinstance(first, str) else exc).splitlines()[0][:200]
    if "BotoCoreError" in _mro_names(exc):
        return CredentialsError(
            f"no usable S3 credentials{where}: {text}", hint=AWS_CREDENTIALS_HINT
        )
    return CredentialsError(
        f"no usable Google Cloud credentials{where}: {text}", hint=CREDENTIALS_HINT
    )


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a gcsfs ``HttpError`` / google-api-core error / requests error /
    botocore ``ClientError`` (or the OSError s3fs made of one, keeping it as the cause)."""
    for attr in ("code", "status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    status = getattr(response, "status_code", None) or getattr(response, "status", None)
    if isinstance(status, int):
        return status
    cause = exc.__cause__
    if isinstance(exc, OSError) and isinstance(getattr(cause, "response", None), dict):
        return _http_status(cause)  # type: ignore[arg-type]
    return None


def _mro_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def classify(exc: BaseException) -> Kind:
    """Whether ``exc`` is worth retrying ("transient") or must surface now ("permanent")."""
    if isinstance(exc, TransientStorageError):
        return "transient"
    if isinstance(exc, ColabJobError):
        return "permanent"
    status = _http_status(exc)
    if status is not None:
        if status in TRANSIENT_HTTP:
            return "transient"
        if status == 403 and "ratelimitexceeded" in str(exc).lower().replace(" ", ""):
            return "transient"
        return "permanent"
    if isinstance(exc, OSError) and exc.errno is not None:
        return "transient" if exc.errno in TRANSIENT_ERRNOS else "permanent"
    if isinstance(exc, TimeoutError | ConnectionError):
        return "transient"
    if _mro_names(exc) & TRANSIENT_CLASS_NAMES:
        return "transient"
    return "permanent"


def translate(exc: BaseException, *, target: str = "") -> BaseException:
    """Map a permanent backend error into the colabjob tree; unknown errors come back as-is.

    ``target`` names the URL the operation touched; it goes into the message.
    """
    if isinstance(exc, ColabJobError):
        return exc
    where = f" at {target}" if target else ""
    detail = f"{type(exc).__name__}: {exc}"
    if _mro_names(exc) & CREDENTIALS_CLASS_NAMES:
        return credentials_error(exc, where=where)
    status = _http_status(exc)
    code = exc.errno if isinstance(exc, OSError) else None
    text = str(exc).lower()
    if status == 404 or (status is None and isinstance(exc, FileNotFoundError)):
        if _BUCKET_MISSING.search(text):
            return BucketNotFoundError(
                f"bucket not found{where} ({detail})",
                hint="check the bucket name, or create it: aws s3 mb s3://NAME"
                if target.startswith("s3://")
                else "check the bucket name, or create it: gcloud storage buckets create gs://NAME",
            )
        return ObjectNotFoundError(f"no object{where}")
    if status == 412:
        return PreconditionFailedError(f"precondition failed{where}: the object changed")
    if code in FULL_ERRNOS or "quota" in text or status == 507:
        return StorageFullError(
            f"storage is full{where} ({detail})",
            hint="free space or quota (Drive: empty the trash, deleted files still count), "
            "or point the job at a bigger store",
        )
    if status in (401, 403) or code in PERMISSION_ERRNOS or isinstance(exc, PermissionError):
        return StoragePermissionError(
            f"permission denied{where} ({detail})",
            hint="choose a location you can write to, or grant access "
            "(GCS: roles/storage.objectAdmin on the bucket; check `gcloud auth list`; "
            "S3: s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject; check the keys)",
        )
    if status is not None or code is not None:
        return StorageError(f"storage operation failed{where} ({detail})")
    return exc


def _is_transient(exc: BaseException) -> bool:
    return classify(exc) == "transient"


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning(
        "transient storage error (attempt %d): %s; retrying in %.1fs",
        state.attempt_number,
        exc,
        wait,
    )


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently transient errors are retried.

    Waits grow as ``initial * 2**n`` capped at ``maximum``, plus up to ``jitter`` seconds of
    random jitter. ``sleep`` is injectable so tests run without waiting.
    """

    attempts: int = 6
    initial: float = 0.5
    maximum: float = 20.0
    jitter: float = 1.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.initial < 0 or self.maximum < 0 or self.jitter < 0:
            raise ValueError("initial, maximum and jitter must be >= 0")

    def call(self, fn: Callable[[], T], *, target: str = "") -> T:
        """Run ``fn`` retrying transient errors; raise translated permanent ones at once."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=self.initial, max=self.maximum)
            + tenacity.wait_random(0, self.jitter),
            retry=tenacity.retry_if_exception(_is_transient),
            sleep=self.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return retrying(fn)
        except Exception as exc:
            if isinstance(exc, ColabJobError) and not isinstance(exc, TransientStorageError):
                raise
            if _is_transient(exc):
                where = f" at {target}" if target else ""
                raise TransientStorageError(
                    f"storage kept failing{where} after {self.attempts} attempts: "
                    f"{type(exc).__name__}: {exc}",
                    hint="the backend is unreachable or overloaded; check the network "
                    "(Drive: remount with drive.mount('/content/drive', force_remount=True)) "
                    "and run `colabjob resume`",
                ) from exc
            translated = translate(exc, target=target)
            if translated is exc:
                raise
            raise translated from exc


DEFAULT_POLICY = RetryPolicy()


def retrying(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call ``fn(*args, **kwargs)`` under the default retry policy."""
    return DEFAULT_POLICY.call(functools.partial(fn, *args, **kwargs))


@overload
def transient_retry(fn: Callable[P, T], /) -> Callable[P, T]: ...
@overload
def transient_retry(*, policy: RetryPolicy = ...) -> Callable[[Callable[P, T]], Callable[P, T]]: ...
def transient_retry(
    fn: Callable[P, T] | None = None, /, *, policy: RetryPolicy = DEFAULT_POLICY
) -> Callable[P, T] | Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator: ``@transient_retry`` or ``@transient_retry(policy=RetryPolicy(...))``."""

    def decorate(f: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(f)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return policy.call(functools.partial(f, *args, **kwargs))

        return wrapper

    return decorate(fn) if fn is not None else decorate
