"""SLURM requeue (issue 14): ``colabjob`` requeues its own job after a wall-time pause.

The decision as a table (budget or SIGUSR1 pause, rank 0, under the limit counted by
``SLURM_RESTART_COUNT``), ``scontrol`` run for real through a stub on PATH that logs its
argv, and whole CLI runs of a tiny job in a SLURM environment: a budget pause and a SIGUSR1
pause call the stub once each, the limit stops it, completion and failure never call it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from colabjob.errors import ExitCode
from colabjob.runner.record import load_record
from colabjob.runner.slurm import Requeue, requeue_after_pause, requeue_decision
from colabjob.runner.states import JobState
from colabjob.storage.store import open_store
from tests.cli.builders import REPO, run_cli, tiny_train_script
from tests.runner.vm_stubs import write_exe

SCONTROL_STUB = """#!/bin/bash
for arg in "$@"; do printf '[%s]' "$arg"; done >> "$STUB_LOG"
echo >> "$STUB_LOG"
[ -z "${STUB_ERR:-}" ] || { echo "$STUB_ERR" >&2; exit 1; }
"""

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
PAUSED = int(ExitCode.PAUSED)


def decide(env: dict[str, str] | None = None, **kw: object) -> Requeue:
    args: dict[str, object] = {"exit_code": PAUSED, "stop_reason": "budget", "signals": ()}
    args.update(kw)
    return requeue_decision({**SLURM, **(env or {})}, **args)  # type: ignore[arg-type]


def test_a_budget_pause_requeues_the_job() -> None:
    d = decide()
    assert d.argv == ("scontrol", "requeue", "4242")
    assert d.why == "requeue 1 of at most 20"


def test_sigusr1_requeues_but_sigterm_does_not() -> None:
    assert decide(stop_reason="signal", signals=("SIGUSR1",)).argv is not None
    term = decide(stop_reason="signal", signals=("SIGTERM", "SIGUSR1"))
    assert term.argv is None and "SIGTERM" in term.why  # scancel: stays cancelled
    assert decide(stop_reason="signal", signals=()).argv is None


@pytest.mark.parametrize(
    ("kw", "env", "why"),
    [
        ({"exit_code": 0, "stop_reason": "completed"}, {}, "did not pause"),
        ({"exit_code": 1, "stop_reason": "crash"}, {}, "did not pause"),
        ({"stop_reason": "stop_request"}, {}, "not the wall time's"),
        ({"stop_reason": "preemption"}, {}, "not the wall time's"),
        ({}, {"SLURM_PROCID": "1"}, "only SLURM_PROCID 0"),
        ({"node_rank": 1}, {}, "only SLURM_PROCID 0"),
        ({}, {"SLURM_RESTART_COUNT": "20"}, "requeued 20 times already (--max-requeues 20)"),
        ({"max_requeues": 3}, {"SLURM_RESTART_COUNT": "3"}, "--max-requeues 3"),
        ({"max_requeues": 0}, {}, "--max-requeues 0"),
        ({}, {"SLURM_JOB_ID": ""}, "not a SLURM job"),
    ],
)
def test_no_requeue(kw: dict[str, object], env: dict[str, str], why: str) -> None:
    d = decide(env, **kw)
    assert d.argv is None and why in d.why


def test_the_restart_count_moves_the_limit() -> None:
    d = decide({"SLURM_RESTART_COUNT": "19"})
    assert d.argv is not None and d.why == "requeue 20 of at most 20"


@pytest.fixture
def scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "scontrol.log"
    write_exe(tmp_path / "bin" / "scontrol", SCONTROL_STUB)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    return log


def test_scontrol_runs_with_the_job_id(scontrol: Path) -> None:
    said: list[str] = []
    assert requeue_after_pause(decide(), say=said.append)
    assert scontrol.read_text() == "[requeue][4242]\n"
    assert "requeued SLURM job 4242 (requeue 1 of at most 20)" in said[0]


def test_a_refused_requeue_is_told_and_not_raised(
    scontrol: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STUB_ERR", "Requested operation is presently disabled")
    said: list[str] = []
    assert not requeue_after_pause(decide(), say=said.append)
    assert "presently disabled" in said[0] and "#SBATCH --requeue" in said[0]


def test_no_scontrol_on_path_is_told(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    said: list[str] = []
    assert not requeue_after_pause(decide(), say=said.append)
    assert "scontrol not on PATH" in said[0]


# -- whole runs ------------------------------------------------------------------------------
TRAIN = tiny_train_script(
    """
        how = os.environ.get("TEST_STOP", "")
        if how and session.global_step == int(os.environ["TEST_STOP_AT"]):
            if how == "budget":  # what the budget does when SLURM_JOB_END_TIME is near
                session.ctx.policy.trigger("budget", "the wall time is near (test)")
            elif how == "usr1":  # `#SBATCH --signal=USR1@120`, to the srun task
                os.kill(os.getppid(), signal.SIGUSR1)
                for _ in range(3000):  # until it arrives: the stop is then at the next step
                    if session.ctx.policy.should_stop() is not None:
                        break
                    time.sleep(0.01)
            elif how == "fail":
                raise RuntimeError("boom")
"""
)

SPEC = """
job: {name: slurm, kind: python, entrypoint: slurm_train:main}
training: {max_steps: 30, log_every_steps: 1}
checkpoint: {every_steps: 5, every_minutes: null}
budget: {platform: slurm}
"""


def _env(tmp_path: Path, log: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "PYTHONPATH": f"{tmp_path}:{REPO}",
        "STUB_LOG": str(log),
        "OMP_NUM_THREADS": "1",
        **SLURM,
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        **extra,
    }


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.slow
def test_each_wall_time_pause_requeues_once_up_to_the_limit_never_at_the_end(
    tmp_path: Path,
) -> None:
    (tmp_path / "slurm_train.py").write_text(TRAIN)
    (tmp_path / "job.yaml").write_text(SPEC)
    write_exe(tmp_path / "bin" / "scontrol", SCONTROL_STUB)
    log, url = tmp_path / "scontrol.log", str(tmp_path / "job")

    env = _env(tmp_path, log, TEST_STOP="budget", TEST_STOP_AT="4")
    out = run_cli("start", str(tmp_path / "job.yaml"), "--storage", url, env=env)
    assert out.returncode == 75, out.stderr[-3000:]
    assert _calls(log) == ["[requeue][4242]"]
    assert "requeued SLURM job 4242" in out.stderr

    env = _env(tmp_path, log, TEST_STOP="usr1", TEST_STOP_AT="9", SLURM_RESTART_COUNT="1")
    out = run_cli("resume", url, env=env)
    assert out.returncode == 75, out.stderr[-3000:]
    assert _calls(log) == ["[requeue][4242]"] * 2
    assert "requeue 2 of at most 20" in out.stderr

    env = _env(tmp_path, log, TEST_STOP="budget", TEST_STOP_AT="14", SLURM_RESTART_COUNT="3")
    out = run_cli("resume", url, "--max-requeues", "3", env=env)
    assert out.returncode == 75, out.stderr[-3000:]
    assert len(_calls(log)) == 2  # the limit: SLURM_RESTART_COUNT 3 of --max-requeues 3
    assert "not requeued: requeued 3 times already (--max-requeues 3)" in out.stderr

    out = run_cli("resume", url, env=_env(tmp_path, log, SLURM_RESTART_COUNT="4"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_calls(log)) == 2 and "colabjob: requeued" not in out.stderr
    record = load_record(open_store(url))
    assert record.state is JobState.COMPLETED
    assert [s.platform for s in record.history] == ["slurm"] * 4


@pytest.mark.slow
def test_a_failed_job_is_not_requeued(tmp_path: Path) -> None:
    (tmp_path / "slurm_train.py").write_text(TRAIN)
    (tmp_path / "job.yaml").write_text(SPEC)
    write_exe(tmp_path / "bin" / "scontrol", SCONTROL_STUB)
    log, url = tmp_path / "scontrol.log", str(tmp_path / "job")
    env = _env(tmp_path, log, TEST_STOP="fail", TEST_STOP_AT="3")
    out = run_cli("start", str(tmp_path / "job.yaml"), "--storage", url, "--retries", "0", env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    assert _calls(log) == [] and "colabjob: requeued" not in out.stderr
    assert load_record(open_store(url)).state is JobState.FAILED
