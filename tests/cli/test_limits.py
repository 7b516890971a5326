"""Bad input that once hurt the machine or crashed the CLI, refused up front with exit 2.

- ``--nproc`` above one per visible GPU (with CUDA) or per CPU core (without) is refused
  before any process starts or anything is written: on ``start``, on ``resume``, by the
  launcher module and by the library's ``launch`` / ``Launcher``. The machine is faked
  through its two seams, ``os.sched_getaffinity`` and ``torch.cuda``; the subprocess tests
  ask for more processes than any machine has.
- A spec nested thousands of levels deep (in the file or in a ``--set`` value) exits 2 with
  one line instead of a ``RecursionError``.
- The stop margin has one default, the spec's, used by the budget, the watchdog, the CLI's
  help and ``colabjob init``'s template alike.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from colabjob.cli import main
from colabjob.config import DEFAULT_MARGIN, BudgetSpec, render_template
from colabjob.errors import ConfigError
from colabjob.jobs.policy import StopReason
from colabjob.runner import budget, launch, ranks, watchdog
from colabjob.runner.platforms import parse_duration
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from tests.cli.builders import REPO, make_job, run_cli

HUGE = 100_000  # more processes than any machine has cores or GPUs


def _spec(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        "job: {name: t, kind: python, entrypoint: 'train:main'}\n"
        "training: {max_steps: 10}\n" + extra
    )
    return path


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-core machine without CUDA, on which nothing may start a process."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_process(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a process was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", no_process)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("colabjob: error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- --nproc ----------------------------------------------------------------------------------
def test_start_refuses_more_processes_than_cores_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], two_cores: None
) -> None:
    store = tmp_path / "job"
    argv = ["start", str(_spec(tmp_path)), "--storage", str(store), "--nproc", str(HUGE)]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"--nproc {HUGE}" in err and "2 CPU cores" in err and "--nproc 2 or fewer" in err
    assert not store.exists()


def test_resume_refuses_more_processes_than_cores_and_leaves_the_job_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], two_cores: None
) -> None:
    store = make_job(tmp_path, "job", segments=[(0, 5, StopReason.BUDGET)])
    before = load_record(store)
    assert main(["resume", str(tmp_path / "job"), "--nproc", "3", "--set", "budget.margin=9m"]) == 2
    err = _one_line_error(capsys)
    assert "--nproc 3" in err and "2 CPU cores" in err
    after = load_record(store)
    assert after == before and after.state is JobState.SUSPENDED  # no snapshot, no lease


def test_with_cuda_the_limit_is_the_visible_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], two_cores: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["start", str(_spec(tmp_path)), "--storage", str(tmp_path / "job"), "--nproc", "2"]
    assert main(argv) == 2
    assert "1 visible GPU:" in _one_line_error(capsys)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert ranks.nproc_limit() == (4, "4 visible GPUs")
    ranks.check_nproc(4)  # at the limit: allowed
    with pytest.raises(ConfigError, match="5 is more than this machine's 4 visible GPUs"):
        ranks.check_nproc(5)


def test_the_library_entry_points_are_bounded_too(two_cores: None) -> None:
    ranks.check_nproc(2)  # one per core is allowed
    with pytest.raises(ConfigError, match="2 CPU cores"):
        launch.launch(["true"], nproc=3)
    launcher = launch.Launcher([["true"]] * 3)
    with pytest.raises(ConfigError, match="--nproc 3 is more than"):
        launcher.start()
    assert launcher.procs == []


def test_cores_come_from_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {3}, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert ranks.cpu_cores() == 1  # a container or SLURM share, not the host's 64


@pytest.mark.slow
def test_real_cli_and_launcher_refuse_a_huge_nproc(tmp_path: Path) -> None:
    store = tmp_path / "job"
    got = run_cli("start", str(_spec(tmp_path)), "--storage", str(store), "--nproc", str(HUGE))
    assert got.returncode == 2, got.stderr
    assert got.stderr.count("\n") == 1 and f"--nproc {HUGE} is more than" in got.stderr
    assert not store.exists()
    got = subprocess.run(
        [sys.executable, "-m", "colabjob.runner.launch", "--nproc", str(HUGE), "--", "true"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert got.returncode == 2 and f"--nproc {HUGE} is more than" in got.stderr


# -- deep nesting -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        "extra: " + "[" * 5000 + "]" * 5000 + "\n",  # PyYAML recurses once per level
        "deep:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 3000)) + "  " * 3000 + "x: 1\n",
        "job2: " + "[" * 100 + "]" * 100 + "\n",  # parses, but deeper than any spec
    ],
    ids=["flow-5000", "block-3000", "flow-100"],
)
def test_a_deeply_nested_spec_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str
) -> None:
    assert main(["start", str(_spec(tmp_path, extra)), "--storage", str(tmp_path / "j")]) == 2
    assert "nests more than 64 levels deep" in _one_line_error(capsys)
    assert not (tmp_path / "j").exists()


def test_a_deeply_nested_set_value_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = "job.args=" + "[" * 5000 + "]" * 5000
    assert main(["start", str(_spec(tmp_path)), "--set", deep]) == 2
    assert "a --set value nests more than 64 levels deep" in _one_line_error(capsys)


# -- the stop margin --------------------------------------------------------------------------
def test_the_margin_has_one_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert DEFAULT_MARGIN == "5m"
    assert BudgetSpec().margin is DEFAULT_MARGIN
    assert budget.DEFAULT_MARGIN is DEFAULT_MARGIN
    for fn in (budget.budget_for, watchdog.watchdog_for):
        assert inspect.signature(fn).parameters["margin"].default is DEFAULT_MARGIN
    assert budget.StopBeforeDeadline(None).margin == parse_duration(DEFAULT_MARGIN) == 300
    assert f"  margin: {DEFAULT_MARGIN} " in render_template("lora")
    with pytest.raises(SystemExit):
        main(["start", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"time kept free after the final save (default {DEFAULT_MARGIN})" in help_text
