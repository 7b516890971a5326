"""retry.py: which errors are transient, what permanent ones become, how the policy backs off,
and — through the seeded FlakyStore — that every Store operation survives transient faults
while permanent ones surface after exactly one attempt."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from colabjob.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    ColabJobError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StorageFullError,
    StoragePermissionError,
    TransientStorageError,
)
from colabjob.storage import Store, Version, open_store
from colabjob.storage.retry import RetryPolicy, classify, retrying, transient_retry, translate
from tests.storage.flaky import FakeHTTPError, FlakyStore, transient_errors


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def _policy(attempts: int = 5, jitter: float = 0.0) -> tuple[RetryPolicy, Sleeps]:
    sleeps = Sleeps()
    policy = RetryPolicy(attempts=attempts, initial=0.5, maximum=3.0, jitter=jitter, sleep=sleeps)
    return policy, sleeps


# ---- classification ------------------------------------------------------------------------


def _real_library_errors() -> list[tuple[BaseException, str]]:
    import aiohttp
    import requests
    from gcsfs.retry import HttpError
    from google.api_core import exceptions as api

    return [
        (api.ServiceUnavailable("down"), "transient"),
        (api.TooManyRequests("slow down"), "transient"),
        (api.InternalServerError("oops"), "transient"),
        (api.Forbidden("no"), "permanent"),
        (api.NotFound("gone"), "permanent"),
        (HttpError({"code": 503, "message": "backend"}), "transient"),
        (HttpError({"code": 403, "message": "denied"}), "permanent"),
        (requests.exceptions.ConnectionError("reset"), "transient"),
        (requests.exceptions.ReadTimeout("slow"), "transient"),
        (aiohttp.ServerDisconnectedError(), "transient"),
    ]


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (OSError(errno.ENOTCONN, "Transport endpoint is not connected"), "transient"),
        (OSError(errno.EIO, "Input/output error"), "transient"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "transient"),
        (TimeoutError("timed out"), "transient"),
        (FakeHTTPError(429), "transient"),
        (FakeHTTPError(503), "transient"),
        (FakeHTTPError(500), "transient"),
        (FakeHTTPError(408), "transient"),
        (FakeHTTPError(403, "rateLimitExceeded"), "transient"),
        (FakeHTTPError(403), "permanent"),
        (FakeHTTPError(404), "permanent"),
        (FakeHTTPError(412), "permanent"),
        (OSError(errno.ENOSPC, "No space left on device"), "permanent"),
        (OSError(errno.EACCES, "Permission denied"), "permanent"),
        (OSError(errno.EROFS, "Read-only file system"), "permanent"),
        (FileNotFoundError(errno.ENOENT, "missing"), "permanent"),
        (ValueError("a bug"), "permanent"),
        (TransientStorageError("spent"), "transient"),
        (ObjectNotFoundError("gone"), "permanent"),
        *_real_library_errors(),
    ],
    ids=repr,
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (FakeHTTPError(403, "Forbidden"), StoragePermissionError),
        (OSError(errno.EACCES, "Permission denied"), StoragePermissionError),
        (OSError(errno.EROFS, "Read-only file system"), StoragePermissionError),
        (PermissionError("nope"), StoragePermissionError),
        (OSError(errno.ENOSPC, "No space left on device"), StorageFullError),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), StorageFullError),
        (FakeHTTPError(403, "quotaExceeded: storage quota"), StorageFullError),
        (FakeHTTPError(404, "The specified bucket does not exist."), BucketNotFoundError),
        (FakeHTTPError(404, "No such object: test-bucket/x"), ObjectNotFoundError),
        (FileNotFoundError(errno.ENOENT, "missing"), ObjectNotFoundError),
        (FakeHTTPError(412), PreconditionFailedError),
        (OSError(errno.ENOTDIR, "Not a directory"), StorageError),
    ],
    ids=repr,
)
def test_translate_permanent_errors(exc: BaseException, expected: type[StorageError]) -> None:
    got = translate(exc, target="gs://b/k")
    assert type(got) is expected
    assert "gs://b/k" in str(got)
    if expected in (StoragePermissionError, StorageFullError, BucketNotFoundError):
        assert isinstance(got, ColabJobError) and got.hint, "permanent errors say what to do"


def test_translate_leaves_unknown_errors_alone() -> None:
    bug = KeyError("x")
    assert translate(bug) is bug


# ---- the policy ------------------------------------------------------------------------------


def test_transient_errors_are_retried_with_exponential_backoff() -> None:
    policy, sleeps = _policy(attempts=6)
    attempts = 0

    def op() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 5:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return "ok"

    assert policy.call(op) == "ok"
    assert attempts == 5
    assert sleeps.waits == [0.5, 1.0, 2.0, 3.0]  # doubling, capped at maximum


def test_jitter_stays_within_bounds() -> None:
    policy, sleeps = _policy(attempts=4, jitter=1.0)
    with pytest.raises(TransientStorageError):
        policy.call(lambda: (_ for _ in ()).throw(FakeHTTPError(503)))
    for base, wait in zip([0.5, 1.0, 2.0], sleeps.waits, strict=True):
        assert base <= wait <= base + 1.0


def test_spent_retries_raise_transient_storage_error() -> None:
    policy, sleeps = _policy(attempts=3)
    attempts = 0

    def op() -> None:
        nonlocal attempts
        attempts += 1
        raise FakeHTTPError(503, "Service Unavailable")

    with pytest.raises(TransientStorageError, match="after 3 attempts") as info:
        policy.call(op, target="gs://b/k")
    assert attempts == 3
    assert len(sleeps.waits) == 2
    assert isinstance(info.value.__cause__, FakeHTTPError)
    assert "gs://b/k" in str(info.value)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (FakeHTTPError(403), StoragePermissionError),
        (OSError(errno.ENOSPC, "No space left on device"), StorageFullError),
        (FakeHTTPError(404, "The specified bucket does not exist."), BucketNotFoundError),
        (AlreadyExistsError("taken"), AlreadyExistsError),
        (ValueError("a bug"), ValueError),
    ],
    ids=repr,
)
def test_permanent_errors_surface_after_one_attempt(
    exc: BaseException, expected: type[BaseException]
) -> None:
    policy, sleeps = _policy()
    attempts = 0

    def op() -> None:
        nonlocal attempts
        attempts += 1
        raise exc

    with pytest.raises(expected) as info:
        policy.call(op)
    assert attempts == 1
    assert sleeps.waits == []
    if type(exc) is not expected:
        assert info.value.__cause__ is exc


def test_retrying_and_decorator_use_the_same_policy() -> None:
    policy, sleeps = _policy()
    outcomes = iter([TimeoutError("slow"), None])

    @transient_retry(policy=policy)
    def flaky(x: int) -> int:
        failure = next(outcomes)
        if failure:
            raise failure
        return x * 2

    assert flaky(21) == 42
    assert len(sleeps.waits) == 1
    assert retrying(lambda a, b: a + b, 1, b=2) == 3

    @transient_retry
    def plain() -> str:
        return "ok"

    assert plain() == "ok"


def test_policy_validates() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(initial=-1)


# ---- fault injection through every Store operation -------------------------------------


def _exercise(store: Store, tmp_path: Path) -> None:
    """Every contract method once; assertions check the results, not just 'no exception'."""
    store.write_bytes("a/x", b"x")
    assert store.read_bytes("a/x") == b"x"
    src = tmp_path / "src"
    src.write_bytes(b"file")
    store.put_file(src, "a/f")
    store.get_file("a/f", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == b"file"
    assert store.exists("a/x") and store.size("a/f") == 4
    assert store.list() == ["a/f", "a/x"] and store.list_dirs() == ["a"]
    store.move("a/x", "b/x")
    assert store.list() == ["a/f", "b/x"]
    v1 = store.create("ctl/lease", b"1")
    v2 = store.replace("ctl/lease", b"2", v1)
    assert store.read_versioned("ctl/lease") == (b"2", v2)
    store.delete("b/x")
    store.delete_prefix("a")
    store.flush()
    assert store.list() == ["ctl/lease"]


@pytest.mark.parametrize("seed", range(4))
def test_operations_survive_transient_faults(store_url: str, tmp_path: Path, seed: int) -> None:
    policy, sleeps = _policy(attempts=8)
    inner = open_store(store_url, retry=policy)
    flaky = FlakyStore(inner, rate=0.4, seed=seed, retry=policy)
    _exercise(flaky, tmp_path)
    assert sum(flaky.failures.values()) > 0, "the test injected no fault"
    assert len(sleeps.waits) >= sum(flaky.failures.values())


def _fail_first_call_of(flaky: FlakyStore, ops: set[str]) -> None:
    """Make only the first backend call of each of ``ops`` fail (transiently)."""
    seen: set[str] = set()

    def fault(op: str) -> BaseException | None:
        flaky.calls[op] += 1
        if op in ops and op not in seen:
            seen.add(op)
            flaky.failures[op] += 1
            return FakeHTTPError(503, "reply lost")
        return None

    flaky._fault = fault  # type: ignore[method-assign]


def test_lost_replies_do_not_fail_create_replace_or_move(store_url: str) -> None:
    """The server applied the write but the reply was lost: the retry meets its own write."""
    policy, _ = _policy(attempts=4)
    inner = open_store(store_url, retry=policy)
    flaky = FlakyStore(inner, when="after", retry=policy)
    _fail_first_call_of(flaky, {"create", "replace", "move"})
    v1 = flaky.create("ctl/lease", b"mine")
    assert inner.read_versioned("ctl/lease") == (b"mine", v1)
    v2 = flaky.replace("ctl/lease", b"mine-2", v1)
    assert inner.read_versioned("ctl/lease") == (b"mine-2", v2)
    flaky.move("ctl/lease", "ctl/moved")
    assert inner.read_bytes("ctl/moved") == b"mine-2" and not inner.exists("ctl/lease")
    assert flaky.failures == {"create": 1, "replace": 1, "move": 1}


def test_lost_reply_does_not_hide_a_real_conflict(store_url: str) -> None:
    policy, _ = _policy(attempts=4)
    inner = open_store(store_url, retry=policy)
    inner.create("ctl/lease", b"theirs")
    flaky = FlakyStore(inner, retry=policy)  # fails before delegating: ours never landed
    _fail_first_call_of(flaky, {"create"})
    with pytest.raises(AlreadyExistsError):
        flaky.create("ctl/lease", b"mine")
    assert inner.read_bytes("ctl/lease") == b"theirs"
    assert flaky.calls["create"] == 2


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), StoragePermissionError),
        (FakeHTTPError(403, "Forbidden"), StoragePermissionError),
        (OSError(errno.ENOSPC, "No space left on device"), StorageFullError),
    ],
    ids=repr,
)
def test_permanent_faults_surface_at_once(exc: BaseException, expected: type[StorageError]) -> None:
    policy, sleeps = _policy(attempts=8)
    flaky = FlakyStore(open_store("memory://perm", retry=policy), permanent=exc, retry=policy)
    with pytest.raises(expected):
        flaky.write_bytes("k", b"v")
    assert flaky.calls["write_bytes"] == 1
    assert sleeps.waits == []


def test_exhausted_retries_name_the_object(fast_retry: RetryPolicy) -> None:
    flaky = FlakyStore(open_store("memory://exhaust"), rate=1.0, retry=fast_retry)
    with pytest.raises(TransientStorageError, match="memory://exhaust/k"):
        flaky.read_bytes("k")
    assert flaky.calls["read_bytes"] == fast_retry.attempts


def test_flaky_store_errors_are_all_transient() -> None:
    assert all(classify(make()) == "transient" for make in transient_errors())


def test_versions_survive_a_flaky_child(fast_retry: RetryPolicy) -> None:
    flaky = FlakyStore(open_store("memory://child-flaky"), rate=0.5, seed=3, retry=fast_retry)
    child = flaky.child("jobs/j")
    version = child.create("lease", b"1")
    assert isinstance(version, Version)
    assert flaky.read_bytes("jobs/j/lease") == b"1"
