"""What only S3 has, on moto's real S3 server (the contract itself runs in
``test_store_contract.py``): a service that ignores conditional writes is refused for the lease
and record operations; the endpoint in the URL survives children and other processes; bad
URLs, a missing bucket and missing credentials are clear errors; s3fs/botocore errors are
classified by their HTTP status."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from colabjob.errors import (
    BucketNotFoundError,
    CredentialsError,
    UnsupportedURLError,
)
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import Holder
from colabjob.runner.record import create_record
from colabjob.storage import open_store
from colabjob.storage.retry import RetryPolicy, classify, translate
from tests.s3_emulator import running_s3_emulator

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[2]
BUCKET = "lax-bucket"


@pytest.fixture(scope="module")
def lax_endpoint(s3_emulator: str) -> Iterator[str]:
    """A second moto server that accepts If-None-Match / If-Match and ignores them."""
    with running_s3_emulator(BUCKET, ignore_conditions=True) as url:
        yield url


def test_a_service_ignoring_conditional_writes_is_refused_for_lease_ops(
    lax_endpoint: str, fast_retry: RetryPolicy
) -> None:
    store = open_store(f"s3://{BUCKET}/job?endpoint_url={lax_endpoint}", retry=fast_retry)
    store.write_bytes("ckpt/data.bin", b"bulk works")  # reads and bulk writes still work
    assert store.read_bytes("ckpt/data.bin") == b"bulk works"
    lease = Lease(store, holder=Holder.here(session_id="a"), ttl=30)
    with pytest.raises(UnsupportedURLError) as info:
        lease.acquire()
    err = info.value
    assert err.exit_code == 2
    assert "does not enforce conditional writes (If-None-Match / If-Match)" in str(err)
    assert err.hint is not None and "AWS S3, Cloudflare R2, Backblaze B2, MinIO" in err.hint
    with pytest.raises(UnsupportedURLError):
        create_record(store, job_id="j", config={})
    assert store.list() == ["ckpt/data.bin"], "no lease, record or probe object left behind"


def test_the_same_store_on_a_strict_service_takes_the_lease(
    s3_bucket: str, fast_retry: RetryPolicy
) -> None:
    """The control for the test above: same code, a server that enforces the headers."""
    store = open_store(s3_bucket, retry=fast_retry)
    assert Lease(store, holder=Holder.here(session_id="a"), ttl=30).acquire().epoch == 1
    with pytest.raises(Exception, match="already running"):
        Lease(store, holder=Holder.here(session_id="b"), ttl=30).acquire()


def test_endpoint_in_the_url_reaches_children_and_other_processes(
    s3_emulator: str, s3_bucket: str
) -> None:
    url = f"{s3_bucket}?endpoint_url={s3_emulator}"
    store = open_store(url)
    assert store.url == url
    child = store.child("jobs/j1")
    assert child.url == f"{s3_bucket}/jobs/j1?endpoint_url={s3_emulator}"
    assert child.url_of("job.json") == f"{s3_bucket}/jobs/j1/job.json?endpoint_url={s3_emulator}"
    child.create("job.json", b"{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env["PYTHONPATH"] = str(REPO)
    code = "import sys; from colabjob.storage import open_store; "
    code += "print(open_store(sys.argv[1]).read_bytes('job.json').decode())"
    out = subprocess.run(
        [sys.executable, "-c", code, child.url], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{}"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3://b/x?region=eu", "unknown or empty options"),
        ("s3://b/x?endpoint_url=", "unknown or empty options"),
        ("s3://b/x?endpoint_url=ftp://h", "not an http"),
        ("s3://user@b/x", "without a bucket"),
    ],
)
def test_bad_s3_urls_are_usage_errors(url: str, match: str) -> None:
    with pytest.raises(UnsupportedURLError, match=match) as info:
        open_store(url)
    assert info.value.exit_code == 2


def test_missing_bucket_names_the_command(s3_emulator: str) -> None:
    with pytest.raises(BucketNotFoundError) as info:
        open_store("s3://no-such-bucket-here/jobs")
    assert "aws s3 mb s3://no-such-bucket-here" in str(info.value)


def test_no_credentials_is_a_usage_error_with_the_aws_hint(
    s3_emulator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe
    with pytest.raises(CredentialsError) as info:
        open_store("s3://test-bucket/jobs", retry=RetryPolicy(attempts=1))
    assert info.value.exit_code == 2
    assert "no usable S3 credentials" in str(info.value)
    assert info.value.hint is not None and "AWS_ACCESS_KEY_ID" in info.value.hint


@pytest.mark.parametrize(
    ("status", "code", "kind", "translated"),
    [
        (503, "SlowDown", "transient", None),
        (500, "InternalError", "transient", None),
        (400, "InvalidArgument", "permanent", "StorageError"),
        (403, "AccessDenied", "permanent", "StoragePermissionError"),
        (404, "NoSuchBucket", "permanent", "BucketNotFoundError"),
        (404, "NoSuchKey", "permanent", "ObjectNotFoundError"),
        (412, "PreconditionFailed", "permanent", "PreconditionFailedError"),
    ],
)
def test_s3fs_errors_are_classified_by_their_http_status(
    status: int, code: str, kind: str, translated: str | None
) -> None:
    """s3fs turns botocore's ClientError into OSErrors (500 -> EREMOTEIO, unknown codes ->
    EIO); the retry policy judges them by the HTTP status the ClientError carried."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    messages = {"NoSuchBucket": "The specified bucket does not exist"}
    response = {
        "Error": {"Code": code, "Message": messages.get(code, code)},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    raw = ClientError(response, "PutObject")  # type: ignore[arg-type]
    for exc in (raw, translate_boto_error(raw)):
        assert classify(exc) == kind, (exc, type(exc))
        if translated:
            got = translate(exc, target="s3://b/k")
            assert type(got).__name__ == translated, (exc, got)
