"""``status``, ``ls``, ``logs``, ``plot`` on jobs built directly in every state: right figures,
plain text, no torch, exit codes. The figures are checked in-process (``colabjob.cli.main``,
output captured, not a TTY: fast); one test runs them as a user does (a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colabjob.jobs.policy import StopReason
from colabjob.runner.states import JobEvent
from tests.cli.builders import hold_lease, make_job, run_cli, run_main

S = StopReason
ANSI = "\x1b["


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One storage root with a job in each state."""
    root = tmp_path_factory.mktemp("jobs")
    make_job(root, "created", segments=[], checkpoint=False)
    running = make_job(root, "running", segments=[(0, 40, S.BUDGET), (40, 0, None)])
    hold_lease(running, step=55)
    make_job(root, "lost", segments=[(0, 30, None)])  # RUNNING, but no lease: the VM vanished
    make_job(root, "suspended", segments=[(0, 20, S.BUDGET), (20, 50, S.SIGNAL)])
    make_job(root, "completed", segments=[(0, 60, S.BUDGET), (60, 100, S.COMPLETED)])
    make_job(root, "failed", segments=[(0, 20, S.BUDGET), (20, 25, S.CRASH)])
    make_job(root, "cancelled", segments=[(0, 10, S.BUDGET)], final=JobEvent.CANCEL)
    (root / "not-a-job").mkdir()
    (root / "not-a-job" / "x.txt").write_text("x")
    return root


EXPECTED = {
    "created": ("CREATED", "step        -"),
    "running": ("RUNNING on vm (colab, pid 4242", "step        55/100 (55%)"),
    "lost": ("SUSPENDED (recorded running; no live runner)", "step        30/100"),
    "suspended": ("SUSPENDED", "step        50/100 (50%)"),
    "completed": ("COMPLETED", "step        100/100 (100%)"),
    "failed": ("FAILED", "step        25/100"),
    "cancelled": ("CANCELLED", "step        10/100"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_status_of_each_state(root: Path, name: str) -> None:
    out = run_main("status", str(root / name))
    assert out.returncode == 0, out.stderr
    state, step = EXPECTED[name]
    assert f"state       {state}" in out.stdout
    assert step in out.stdout
    assert ANSI not in out.stdout + out.stderr


def test_status_details_and_eta(root: Path) -> None:
    out = run_main("status", str(root / "suspended"), "--json")
    s = json.loads(out.stdout)
    assert (s["state"], s["step"], s["total"], s["checkpoint_step"]) == ("suspended", 50, 100, 50)
    assert (s["segments"], s["last_stop_reason"]) == (2, "signal")
    # 50 steps in 200 s of segments -> 0.25 steps/s; 50 left -> 200 s; 1h budget - 5m margin
    assert s["steps_per_second"] == pytest.approx(0.25)
    assert s["eta_seconds"] == pytest.approx(200.0)
    assert (s["session_limit"], s["sessions_left"]) == (3300.0, 1)
    text = run_main("status", str(root / "failed")).stdout
    assert "segments    2 (1 crashed), last stop: crash" in text
    assert "checkpoint  step 25," in text


def test_status_does_not_import_torch(root: Path) -> None:
    code = (
        "import sys; from colabjob.cli import main; "
        f"rc = main(['status', {str(root / 'running')!r}]); "
        f"rc2 = main(['ls', {str(root)!r}]); "
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "print('HEAVY', heavy, rc, rc2)"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY [] 0 0" in out.stdout


def test_ls_lists_every_job_under_a_root(root: Path) -> None:
    out = run_main("ls", str(root))
    assert out.returncode == 0, out.stderr
    title, header, *lines = out.stdout.strip().splitlines()
    assert title == f"jobs under {root}"
    assert header.split()[:4] == ["JOB", "KIND", "STATE", "STEP"]
    states = {line.split()[0]: line.split()[2] for line in lines}
    assert states == {
        "cancelled": "cancelled",
        "completed": "completed",
        "created": "created",
        "failed": "failed",
        "lost": "suspended",
        "running": "running",
        "suspended": "suspended",
    }
    assert ANSI not in out.stdout
    jobs = [json.loads(line) for line in run_main("ls", str(root), "--json").stdout.splitlines()]
    assert len(jobs) == 7


def test_logs_are_jsonl_with_metrics_and_events(root: Path) -> None:
    out = run_main("logs", str(root / "completed"))
    assert out.returncode == 0, out.stderr
    items = [json.loads(line) for line in out.stdout.splitlines()]
    rows = [i for i in items if "event" not in i]
    assert [r["step"] for r in rows] == list(range(1, 101))
    events = [i["event"] for i in items if "event" in i]
    assert events.count("segment_start") == 2 and events.count("segment_end") == 2
    assert "checkpoint" in events


def test_plot_writes_a_png_with_one_marker_per_boundary(root: Path, tmp_path: Path) -> None:
    png = tmp_path / "loss.png"
    out = run_main("plot", str(root / "failed"), "-o", str(png))
    assert out.returncode == 0, out.stderr
    assert "1 session boundary" in out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[2] in (3, 4)


def test_bad_input_exits_2(root: Path, tmp_path: Path) -> None:
    for args in (
        ("status", str(tmp_path / "nothing")),
        ("status", "ftp://host/job"),
        ("logs", str(tmp_path / "nothing")),
        ("ls", "nope://x"),
        ("frobnicate",),
    ):
        out = run_main(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr
    out = run_main("plot", str(root / "created"), "-o", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "no committed loss values" in out.stderr


def test_logs_export_tensorboard_scalars_once_per_step(root: Path, tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    out = run_main("logs", str(root / "failed"), "--tensorboard", str(tb))
    assert out.returncode == 0, out.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 26))
    assert loss[0].value == pytest.approx(2.5)
    assert {"train/loss", "train/lr", "train/samples"} <= set(acc.Tags()["scalars"])


def test_read_only_commands_as_a_user_runs_them(root: Path) -> None:
    """The real entry point in a subprocess (not a TTY): same text, plain, real exit codes."""
    out = run_cli("status", str(root / "suspended"))
    assert out.returncode == 0, out.stderr
    assert "state       SUSPENDED" in out.stdout
    out = run_cli("ls", str(root))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"jobs under {root}")
    out = run_cli("logs", str(root / "failed"))
    assert out.returncode == 0, out.stderr
    assert len([line for line in out.stdout.splitlines() if '"event"' not in line]) == 25
    assert ANSI not in out.stdout + out.stderr
    out = run_cli("frobnicate")
    assert out.returncode == 2 and "Traceback" not in out.stderr
