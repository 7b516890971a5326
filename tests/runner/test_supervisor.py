"""The supervisor runs a segment in a child process: crashes are recorded and retried from
the last checkpoint (bounded), user errors are not, signals reach the child, and the
outcome maps to the exit code. The child is a scripted stand-in (``supervisor_child``)
working on a real job record and lease on local disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colabjob.errors import (
    ConfigError,
    CorruptCheckpointError,
    ExitCode,
    LeaseHeldError,
    StaleEpochError,
    StoragePermissionError,
    TransientStorageError,
)
from colabjob.jobs.policy import StopReason
from colabjob.runner.lease.info import read_lease
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.runner.supervisor import (
    ChildResult,
    RunRequest,
    Supervisor,
    classify_error,
)
from colabjob.storage.store import open_store

REPO = Path(__file__).resolve().parents[2]
CHILD = "tests.runner.supervisor_child"


def _request(tmp_path: Path, script: list[str]) -> RunRequest:
    return RunRequest(
        url=str(tmp_path / "job"), spec={"dir": str(tmp_path), "script": script}, progress="none"
    )


def _run(tmp_path: Path, script: list[str], retries: int = 2) -> tuple[int, int, list[str]]:
    said: list[str] = []
    result = Supervisor(
        _request(tmp_path, script),
        retries=retries,
        backoff=0.0,
        child_module=CHILD,
        say=said.append,
    ).run()
    return result.exit_code, result.attempts, said


def test_completed_segment_exits_0(tmp_path: Path) -> None:
    code, attempts, _ = _run(tmp_path, ["ok"])
    assert (code, attempts) == (ExitCode.DONE, 1)
    assert load_record(open_store(tmp_path / "job")).state is JobState.COMPLETED


def test_paused_segment_exits_75(tmp_path: Path) -> None:
    code, attempts, _ = _run(tmp_path, ["pause"])
    assert (code, attempts) == (ExitCode.PAUSED, 1)
    assert load_record(open_store(tmp_path / "job")).state is JobState.SUSPENDED


def test_killed_child_is_recorded_and_retried_from_the_last_checkpoint(tmp_path: Path) -> None:
    code, attempts, said = _run(tmp_path, ["kill", "ok"])
    assert (code, attempts) == (ExitCode.DONE, 2)
    store = open_store(tmp_path / "job")
    record = load_record(store)
    assert record.state is JobState.COMPLETED
    crashed, done = record.history
    assert crashed.stop_reason is StopReason.CRASH
    assert "SIGKILL" in (crashed.error or "")
    assert done.stop_reason is StopReason.COMPLETED and done.first_step == 3
    assert record.extras["crashes"] == 1
    assert any("retry 1/2" in line for line in said)
    lease = read_lease(store)
    assert lease is not None and lease[0].released


def test_exception_in_training_is_retried(tmp_path: Path) -> None:
    code, attempts, _ = _run(tmp_path, ["raise", "ok"])
    assert (code, attempts) == (ExitCode.DONE, 2)
    record = load_record(open_store(tmp_path / "job"))
    assert [s.stop_reason for s in record.history] == [StopReason.CRASH, StopReason.COMPLETED]


def test_retries_are_bounded_then_failed(tmp_path: Path) -> None:
    code, attempts, said = _run(tmp_path, ["kill", "exit3", "kill"], retries=2)
    assert (code, attempts) == (ExitCode.FAILED, 3)
    store = open_store(tmp_path / "job")
    record = load_record(store)
    assert record.state is JobState.FAILED
    assert [s.stop_reason for s in record.history] == [StopReason.CRASH] * 3
    assert "status 3" in (record.history[1].error or "")
    assert "no retries left" in said[-1]
    lease = read_lease(store)
    assert lease is not None and lease[0].released  # `resume` need not wait for a TTL


@pytest.mark.parametrize(
    ("action", "code"), [("usage", ExitCode.USAGE), ("import", ExitCode.FAILED)]
)
def test_user_errors_fail_at_once(tmp_path: Path, action: str, code: int) -> None:
    got, attempts, _ = _run(tmp_path, [action, "ok"])
    assert (got, attempts) == (code, 1)


def test_no_retries_when_zero(tmp_path: Path) -> None:
    code, attempts, _ = _run(tmp_path, ["kill", "ok"], retries=0)
    assert (code, attempts) == (ExitCode.FAILED, 1)
    assert load_record(open_store(tmp_path / "job")).state is JobState.FAILED


def test_sigterm_to_the_supervisor_reaches_the_child(tmp_path: Path) -> None:
    req = tmp_path / "request.json"
    req.write_text(_request(tmp_path, ["wait_signal"]).to_json())
    proc = subprocess.Popen(
        [sys.executable, "-m", CHILD, "drive", str(req)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = tmp_path / "ready"
    try:
        for _ in range(600):  # poll for the child to be up (a condition, not a deadline)
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), "child never became ready"
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == ExitCode.PAUSED, out
    assert "exit=75 attempts=1" in out
    record = load_record(open_store(tmp_path / "job"))
    assert record.state is JobState.SUSPENDED
    assert record.history[-1].stop_reason is StopReason.SIGNAL


@pytest.mark.parametrize(
    ("exc", "code", "retry"),
    [
        (ConfigError("x"), ExitCode.USAGE, False),
        (LeaseHeldError("x"), ExitCode.USAGE, False),
        (StaleEpochError("x"), ExitCode.USAGE, False),
        (StoragePermissionError("x"), ExitCode.FAILED, False),
        (TransientStorageError("x"), ExitCode.FAILED, True),
        (CorruptCheckpointError("x"), ExitCode.FAILED, True),
        (RuntimeError("CUDA out of memory"), ExitCode.FAILED, True),
        (ModuleNotFoundError("my_train"), ExitCode.FAILED, False),
        (SyntaxError("bad"), ExitCode.FAILED, False),
    ],
)
def test_classify_error(exc: BaseException, code: int, retry: bool) -> None:
    result = classify_error(exc)
    assert (result.exit_code, result.retryable) == (code, retry)
    assert ChildResult.from_json(result.to_json()) == result


def test_request_round_trips(tmp_path: Path) -> None:
    req = _request(tmp_path, ["ok"])
    assert RunRequest.from_json(req.to_json()) == req
