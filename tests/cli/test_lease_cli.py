"""The lease through the CLI, in subprocesses: a run SIGKILLed whole (supervisor and training
child, as Colab's "Restart runtime" or the OOM killer do) resumes at once on the same machine
without ``--force``; a second ``start`` on a live job names the holder; a damaged lease file is
exit 2 with a hint naming a command that exists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colabjob.jobs.policy import StopReason
from colabjob.runner.lease.info import LEASE_KEY, read_lease
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage.store import open_store
from tests.cli.builders import REPO, hold_lease, make_job, run_cli, tiny_train_script

TRAIN = tiny_train_script(
    """
        if session.global_step == 10 and not os.path.exists(args["marker"]):
            session.save(final=True)
            open(args["marker"], "w").close()
            time.sleep(600)  # killed here
"""
)

SPEC = """
job:
  name: lease
  kind: python
  entrypoint: lease_train:main
  args: {{marker: {marker}}}
training: {{max_steps: 20, log_every_steps: 1}}
checkpoint: {{every_steps: 5, every_minutes: null}}
budget: {{platform: local}}
"""


def _job(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    (tmp_path / "lease_train.py").write_text(TRAIN)
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.format(marker=tmp_path / "marker"))
    return spec, tmp_path / "job", {"PYTHONPATH": f"{tmp_path}:{REPO}"}


@pytest.mark.slow
def test_a_run_sigkilled_whole_resumes_at_once_without_force(tmp_path: Path) -> None:
    spec, url, env = _job(tmp_path)
    log = (tmp_path / "start.log").open("w")
    start = subprocess.Popen(
        [sys.executable, "-m", "colabjob.cli", "start", str(spec), "--storage", str(url)],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        for _ in range(1200):  # the child committed step 10 and sleeps
            if (tmp_path / "marker").exists() or start.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "marker").exists(), (tmp_path / "start.log").read_text()
        got = read_lease(open_store(str(url)))
        assert got is not None and not got[0].released
        child = got[0].holder.pid  # the training process holds (and heartbeats) the lease
        os.kill(start.pid, signal.SIGSTOP)  # the supervisor must not clean up after it
        os.kill(child, signal.SIGKILL)
        os.kill(start.pid, signal.SIGKILL)
        start.wait(30)
    finally:
        if start.poll() is None:
            start.kill()
        log.close()
    got = read_lease(open_store(str(url)))
    assert got is not None and not got[0].released  # still "live": heartbeat < 120 s old

    out = run_cli("resume", str(url), env=env)  # no --force; a 120 s wait would time out
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert f"pid {child} on this machine) is gone; taking its lease over" in text
    assert f"took over the lease of a dead runner on this machine (pid {child}" in text
    assert "watching the lease" not in text
    record = load_record(open_store(str(url)))
    assert record.state is JobState.COMPLETED
    killed, resumed = record.history
    assert killed.stop_reason is StopReason.CRASH
    assert resumed.first_step == 10 and resumed.stop_reason is StopReason.COMPLETED
    assert resumed.epoch == killed.epoch + 1  # the takeover bumped the fencing epoch


def test_a_second_start_on_a_live_job_names_the_holder(tmp_path: Path) -> None:
    spec, _, env = _job(tmp_path)
    store = make_job(tmp_path, "live", segments=[(0, 3, None)])
    hold_lease(store, step=3)
    out = run_cli("start", str(spec), "--storage", store.url, env=env)
    assert out.returncode == 2, out.stderr
    assert f"job {store.url} is already running on vm (colab, pid 4242, session live)" in (
        out.stderr
    )
    assert "expires at" in out.stderr and "a job already exists there (running)" in out.stderr
    assert f"`colabjob resume {store.url} --force`" in out.stderr


def test_a_damaged_lease_is_exit_2_with_a_real_command(tmp_path: Path) -> None:
    store = make_job(tmp_path, "damaged", segments=[(0, 3, None)])
    lease = {
        "holder": {"host": "vm", "platform": "colab", "pid": 7, "session_id": "s"},
        "epoch": 1,
        "ttl": 120,
        "acquired_at": 1_700_000_000,
        "heartbeat_at": 1e300,
    }
    store.write_bytes(LEASE_KEY, json.dumps(lease).encode())
    for args in (["status", store.url], ["resume", store.url]):
        out = run_cli(*args)
        assert out.returncode == 2, out.stderr
        assert "is not a valid lease" in out.stderr and "Traceback" not in out.stderr
        assert f"`colabjob resume {store.url} --force`" in out.stderr
    assert "--force" in run_cli("resume", "--help").stdout  # the command in the hint exists
    store.write_bytes(LEASE_KEY, b"{not json")
    out = run_cli("status", store.url)
    assert out.returncode == 2 and "is not a valid lease" in out.stderr
