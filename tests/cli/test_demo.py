"""``colabjob demo --size tiny`` end to end in a subprocess: three simulated sessions, each a
real runner segment ended by the watchdog's step budget, then the uninterrupted run; the
demo job is an ordinary job afterwards (``status``, TensorBoard files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.builders import run_cli


@pytest.mark.slow  # ~6 s: four real runner segments in subprocesses
def test_tiny_demo_runs_through_the_runner(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    out = run_cli("demo", "--size", "tiny", "--dir", str(root), "--progress", "plain", timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "final weights vs one uninterrupted run: bit-identical" in text
    assert "loss " in text and " at the start -> " in text
    assert "Traceback" not in text
    # the display is fed by the segment itself (plain lines off a terminal): HF's log rows
    # with the step of the whole job, and the last one when it closes
    assert "step 2/16 · loss " in out.stdout and "step 16/16 · loss " in out.stdout
    assert "\x1b[" not in out.stdout

    status = run_cli("status", str(root / "job"), "--json")
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert s["state"] == "completed" and s["segments"] >= 3 and s["step"] == 16
    record = json.loads((root / "job" / "job.json").read_text())
    reasons = [seg["stop_reason"] for seg in record["history"]]
    assert reasons == ["budget", "budget", "completed"]
    assert record["config"]["job"]["kind"] == "scratch"  # the spec snapshot: resumable by CLI
    assert list((root / "job" / "tensorboard").glob("events.out.tfevents.*"))
    straight = json.loads((root / "straight" / "job.json").read_text())
    assert [seg["stop_reason"] for seg in straight["history"]] == ["completed"]
