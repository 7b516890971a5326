"""The CLI end to end, in subprocesses, on a tiny ``python``-kind job (a user function on the
Session API): start -> paused (75) -> status -> resume -> done (0); a SIGKILLed segment
retried from the last checkpoint without duplicating metrics; and the plot of it all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from colabjob.jobs.policy import StopReason
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage.store import open_store
from tests.cli.builders import run_cli, tiny_train_script

pytestmark = pytest.mark.slow

TRAIN = tiny_train_script(
    """
        if os.path.exists(args["marker"]):
            continue  # the resumed segment runs on
        if session.global_step == args.get("save_at"):
            session.save(final=True)  # committed before the kill below
        if session.global_step == args["at"]:
            open(args["marker"], "w").close()
            if args["how"] == "term":  # what SLURM, Colab's stop button or Ctrl-C do
                os.kill(os.getppid(), signal.SIGTERM)  # to the supervisor, which forwards it
                for _ in range(3000):  # until it arrives: the stop is then at the next step
                    if session.ctx.policy.should_stop() is not None:
                        break
                    time.sleep(0.01)
            else:
                os.kill(os.getpid(), signal.SIGKILL)  # the VM vanishes under the child
"""
)

SPEC = """
job:
  name: e2e
  kind: python
  entrypoint: tiny_train:main
  args: {{marker: {marker}, at: {at}, how: {how}, save_at: {save_at}}}
training: {{max_steps: 20, log_every_steps: 1}}
checkpoint: {{every_steps: 5, every_minutes: null}}
budget: {{platform: local}}
"""


def _job(
    tmp_path: Path, *, at: int, how: str, save_at: int | None = None
) -> tuple[Path, Path, dict[str, str]]:
    (tmp_path / "tiny_train.py").write_text(TRAIN)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        SPEC.format(marker=tmp_path / "marker", at=at, how=how, save_at=save_at or "null")
    )
    return spec, tmp_path / "job", {"PYTHONPATH": f"{tmp_path}:{Path.cwd()}"}


def _status(url: Path, env: dict[str, str]) -> dict[str, Any]:
    out = run_cli("status", str(url), "--json", env=env)
    assert out.returncode == 0, out.stderr
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def _metric_steps(url: Path, env: dict[str, str]) -> list[int]:
    out = run_cli("logs", str(url), env=env)
    assert out.returncode == 0, out.stderr
    items = [json.loads(line) for line in out.stdout.splitlines()]
    return [i["step"] for i in items if "event" not in i]


def test_start_pause_resume_done(tmp_path: Path) -> None:
    spec, url, env = _job(tmp_path, at=7, how="term")
    out = run_cli("start", str(spec), "--storage", str(url), env=env)
    assert out.returncode == 75, out.stdout + out.stderr
    assert "\x1b[" not in out.stdout + out.stderr  # not a TTY: plain lines
    assert f"colabjob resume {url}" in out.stderr
    s = _status(url, env)
    assert (s["state"], s["step"], s["checkpoint_step"]) == ("suspended", 8, 8)
    assert s["last_stop_reason"] == "signal"
    assert f"paused at step {s['step']} (signal)" in out.stderr

    out = run_cli("resume", str(url), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    s = _status(url, env)
    assert (s["state"], s["step"], s["total"], s["segments"]) == ("completed", 20, 20, 2)
    assert _metric_steps(url, env) == list(range(1, 21))

    png = tmp_path / "loss.png"
    out = run_cli("plot", str(url), "-o", str(png), env=env)
    assert out.returncode == 0, out.stderr
    assert "20 loss points, 1 session boundary" in out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = run_cli("resume", str(url), env=env)  # nothing left to do
    assert out.returncode == 0 and "already completed" in out.stderr
    out = run_cli("start", str(spec), "--storage", str(url), env=env)
    assert out.returncode == 2 and "already exists" in out.stderr


def test_sigkill_is_retried_from_the_checkpoint_and_metrics_are_not_duplicated(
    tmp_path: Path,
) -> None:
    spec, url, env = _job(tmp_path, at=12, how="kill", save_at=10)
    out = run_cli("start", str(spec), "--storage", str(url), "--retry-backoff", "0", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "killed by SIGKILL" in out.stderr and "retry 1/2" in out.stderr
    record = load_record(open_store(url))
    assert record.state is JobState.COMPLETED
    crashed, done = record.history
    assert crashed.stop_reason is StopReason.CRASH and "SIGKILL" in (crashed.error or "")
    assert done.first_step == 10 and done.stop_reason is StopReason.COMPLETED
    # steps 11 and 12 ran twice (before the kill and after the resume): logged once
    assert _metric_steps(url, env) == list(range(1, 21))


def test_failed_without_retries_then_resumed(tmp_path: Path) -> None:
    spec, url, env = _job(tmp_path, at=6, how="kill", save_at=4)
    out = run_cli("start", str(spec), "--storage", str(url), "--retries", "0", env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert _status(url, env)["state"] == "failed"
    out = run_cli("resume", str(url), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _metric_steps(url, env) == list(range(1, 21))
    s = _status(url, env)
    assert (s["state"], s["crashes"]) == ("completed", 1)
