"""``colabjob handoff --dry-run`` without usable Google Cloud credentials (issue 11, 8d): no
credentials at all, or GOOGLE_APPLICATION_CREDENTIALS pointing at a malformed file, exit 2
with a hint saying how to authenticate in Colab and elsewhere (no raw
``DefaultCredentialsError``); a too-short project id is refused with GCP's rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cli.builders import run_cli

VM = ("--zone", "us-central1-a", "--machine-type", "n1-standard-4", "--dry-run")


def _no_cloud_env(home: Path, **extra: str) -> dict[str, str]:
    env = {"HOME": str(home), "NO_GCE_CHECK": "true", "CLOUDSDK_CONFIG": str(home / "gcloud")}
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _no_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    assert "STORAGE_EMULATOR_HOST" not in os.environ


def _assert_credentials_hint(out: object) -> None:
    stderr = str(getattr(out, "stderr", ""))
    assert getattr(out, "returncode", None) == 2, stderr
    assert "no usable Google Cloud credentials" in stderr
    assert "auth.authenticate_user()" in stderr  # Colab
    assert "gcloud auth application-default login" in stderr  # elsewhere
    assert "Traceback" not in stderr and "DefaultCredentialsError:" not in stderr


def test_handoff_dry_run_without_credentials_exits_2_with_a_hint(tmp_path: Path) -> None:
    out = run_cli(
        "handoff", "gs://some-bucket/jobs/x", "--project", "my-project", *VM,
        env=_no_cloud_env(tmp_path),
    )  # fmt: skip
    _assert_credentials_hint(out)


def test_handoff_dry_run_with_a_malformed_credentials_file_exits_2(tmp_path: Path) -> None:
    creds = tmp_path / "key.json"
    creds.write_text("this is not a service-account key\n")
    env = _no_cloud_env(tmp_path, GOOGLE_APPLICATION_CREDENTIALS=str(creds))
    out = run_cli("handoff", "gs://some-bucket/jobs/x", "--project", "my-project", *VM, env=env)
    _assert_credentials_hint(out)
    assert str(creds) in out.stderr  # which file is wrong


def test_a_short_project_id_is_refused_with_the_rule(tmp_path: Path) -> None:
    out = run_cli(
        "handoff", "gs://some-bucket/jobs/x", "--project", "abc", *VM,
        env=_no_cloud_env(tmp_path),
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "'abc' is not a valid project id" in out.stderr
    assert "6-30 characters" in out.stderr.splitlines()[0]  # the rule, in the message itself
