"""Stopping a CLI run, end to end in subprocesses (issue 11):

- a double Ctrl-C (SIGINT twice to ``colabjob start``, which forwards it) stops without the
  final checkpoint: exit 75 and a message that says the job is SUSPENDED at its last commit,
  which the record confirms; ``resume`` then finishes bit-identical to an uninterrupted run;
- ``colabjob stop`` from another process takes effect within a few steps of a long run
  (counted on the run's fake clock, not in wall time);
- ``--budget 20s`` with the default 5-minute margin is refused (exit 2) before anything is
  written, naming the margin and ``--margin``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from colabjob.jobs.demo import compare_final_weights
from colabjob.jobs.policy import StopReason
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.cli.builders import REPO, run_cli, tiny_train_script

pytestmark = pytest.mark.slow
WAIT = 120.0  # a bound for a child to get somewhere; never a deadline under test

TRAIN = tiny_train_script(
    """
        if session.global_step == args["at"] and not os.path.exists(args["marker"]):
            open(args["marker"], "w").close()
            os.kill(os.getppid(), signal.SIGINT)  # Ctrl-C reaches `colabjob start`: forwarded
            for _ in range(3000):  # until it arrives (the stop would be at the next step)
                if session.ctx.policy.should_stop() is not None:
                    break
                time.sleep(0.01)
            os.kill(os.getppid(), signal.SIGINT)  # ...and Ctrl-C again, before that boundary
            for _ in range(3000):
                time.sleep(0.01)  # the second one interrupts this
"""
)

SPEC = """
job:
  name: ctrlc
  kind: python
  entrypoint: ctrlc_train:main
  args: {{marker: {marker}, at: {at}}}
training: {{max_steps: 20, log_every_steps: 1}}
checkpoint: {{every_steps: 5, every_minutes: null}}
budget: {{platform: local}}
"""


def _job(tmp_path: Path, at: int) -> tuple[Path, dict[str, str]]:
    (tmp_path / "ctrlc_train.py").write_text(TRAIN)
    spec = tmp_path / f"job-{at}.yaml"
    spec.write_text(SPEC.format(marker=tmp_path / f"marker-{at}", at=at))
    return spec, {"PYTHONPATH": f"{tmp_path}:{REPO}"}


def _status(url: Path, env: dict[str, str]) -> dict[str, Any]:
    out = run_cli("status", str(url), "--json", env=env)
    assert out.returncode == 0, out.stderr
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def test_double_ctrl_c_says_suspended_exits_75_and_resumes_exactly(tmp_path: Path) -> None:
    spec, env = _job(tmp_path, at=7)
    url = tmp_path / "job"
    out = run_cli("start", str(spec), "--storage", str(url), env=env)
    assert out.returncode == 75, out.stdout + out.stderr
    assert (
        "interrupted twice: stopped without a final checkpoint; the job is SUSPENDED at step 5 "
        f"(its last commit); resume with `colabjob resume {url}`"
    ) in out.stderr
    assert "failed" not in out.stderr and "fix the cause" not in out.stderr
    s = _status(url, env)
    assert (s["state"], s["checkpoint_step"]) == ("suspended", 5)
    record = load_record(open_store(url))
    assert record.history[-1].stop_reason is StopReason.SIGNAL
    assert "crashes" not in record.extras

    out = run_cli("resume", str(url), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    record = load_record(open_store(url))
    assert record.state is JobState.COMPLETED and record.history[-1].first_step == 5

    straight_spec, env = _job(tmp_path, at=-1)
    out = run_cli("start", str(straight_spec), "--storage", str(tmp_path / "straight"), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert compare_final_weights(tmp_path / "straight", url)


def test_colabjob_stop_takes_effect_within_a_few_steps(tmp_path: Path) -> None:
    url = tmp_path / "job"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.cli.stop_child", str(url), str(tmp_path)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(int(WAIT * 100)):  # until step 5 (a bound, not a timing)
            if (tmp_path / "ready").exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        out = run_cli("stop", str(url), "--reason", "test")
        assert out.returncode == 0, out.stderr
        assert "checkpoint and stop" in out.stderr
        (tmp_path / "asked").write_text("1")
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 75, err[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["stop_reason"] == "stop_request" and not result["completed"]
    # one check per second of the run's clock, 0.25 s a step: seen within 4 steps, then stop
    assert 0 < result["last_step"] - result["asked_at"] <= 5
    assert result["checkpoint_step"] == result["last_step"]
    record = load_record(open_store(url))
    assert record.state is JobState.SUSPENDED
    assert record.history[-1].stop_reason is StopReason.STOP_REQUEST


def test_a_budget_shorter_than_the_margin_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    spec, env = _job(tmp_path, at=-1)
    url = tmp_path / "job"
    out = run_cli("start", str(spec), "--storage", str(url), "--budget", "20s", env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "5m00s margin" in out.stderr and "--margin 2s" in out.stderr
    assert not url.exists()
    out = run_cli("start", str(spec), "--storage", str(url), "--budget", "20s", "--margin", "2s",
                  env=env)  # fmt: skip
    # 20 tiny steps fit in 18 s (done, 0); on a machine too loaded for that: paused (75)
    assert out.returncode in (0, 75), out.stdout + out.stderr
    info = CheckpointStore(open_store(url)).latest()
    assert info is not None and info.step > 0  # either way something was committed
