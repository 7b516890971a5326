"""The CLI end to end on S3 (moto's server), in subprocesses: a job whose URL carries its
endpoint (``?endpoint_url=``, no ``AWS_ENDPOINT_URL`` in the environment) is started, its
segment SIGKILLed after a commit and retried from that checkpoint by the supervisor, and
completed; ``status`` and ``logs`` read it back with the URL alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.cli.builders import run_cli, tiny_train_script

pytestmark = [pytest.mark.slow, pytest.mark.s3]

TRAIN = tiny_train_script(
    """
        if os.path.exists(args["marker"]):
            continue  # the retried segment runs on
        if session.global_step == 10:
            session.save(final=True)  # committed before the kill below
        if session.global_step == 12:
            open(args["marker"], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # the VM vanishes under the child
"""
)

SPEC = """
job:
  name: s3e2e
  kind: python
  entrypoint: tiny_train:main
  args: {{marker: {marker}}}
training: {{max_steps: 20, log_every_steps: 1}}
checkpoint: {{every_steps: 5, every_minutes: null}}
budget: {{platform: local}}
"""


def test_a_job_on_s3_survives_a_sigkill_and_completes(
    s3_emulator: str, s3_bucket: str, tmp_path: Path
) -> None:
    (tmp_path / "tiny_train.py").write_text(TRAIN)
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.format(marker=tmp_path / "marker"))
    url = f"{s3_bucket}/job?endpoint_url={s3_emulator}"
    env = {"PYTHONPATH": f"{tmp_path}:{Path.cwd()}", "AWS_ENDPOINT_URL": ""}
    assert "AWS_ENDPOINT_URL_S3" not in os.environ

    out = run_cli("start", str(spec), "--storage", url, "--retry-backoff", "0", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "killed by SIGKILL" in out.stderr and "retry 1/2" in out.stderr

    out = run_cli("status", url, "--json", env=env)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert (status["state"], status["step"], status["crashes"]) == ("completed", 20, 1)
    out = run_cli("logs", url, env=env)
    assert out.returncode == 0, out.stderr
    steps = [json.loads(line) for line in out.stdout.splitlines()]
    assert [s["step"] for s in steps if "event" not in s] == list(range(1, 21))
