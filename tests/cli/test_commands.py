"""``init``, ``start``/``resume`` refusals, ``stop``, ``gc`` and ``handoff`` through
``colabjob.cli.main`` (in-process: these never start training), with their exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colabjob.cli import main
from colabjob.config import load_spec
from colabjob.jobs.policy import StopReason
from colabjob.runner.record import load_record
from colabjob.runner.states import JobEvent, JobState
from colabjob.runner.stop_request import read_stop_request
from colabjob.storage.checkpoints import CheckpointStore
from tests.cli.builders import hold_lease, make_job, metric_rows, save_checkpoint

S = StopReason


def test_init_writes_a_spec_that_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job.yaml"
    assert main(["init", "--kind", "scratch", "-o", str(out), "--name", "tiny"]) == 0
    spec = load_spec(out)
    assert (spec.job.kind, spec.job.name) == ("scratch", "tiny")
    assert main(["init", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["init", "-o", str(out), "--force"]) == 0
    assert load_spec(out).job.kind == "lora"
    assert main(["init", "--kind", "nope", "-o", str(tmp_path / "x.yaml")]) == 2
    assert main(["init", "--kind", "python", "-o", "-"]) == 0
    assert "kind: python" in capsys.readouterr().out


def _spec(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        "job: {name: t, kind: python, entrypoint: 'train:main'}\n"
        "training: {max_steps: 10}\n" + extra
    )
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "missing.yaml"], "job spec not found"),
        (["start", "{spec}", "--set", "training.nope=1"], "nope"),
        (["start", "{spec}", "--storage", "ftp://host/x"], "unsupported storage URL"),
        (["start", "{spec}", "--budget", "12"], "cannot read budget"),
        (["start", "{spec}", "--platform", "mars"], "unknown platform"),
        (["start", "{bad}"], "unknown key"),
        (["resume", "{tmp}/nothing"], "no job at"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    spec = _spec(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: {name: t, kind: python, entrypoint: 'a:b', colour: red}\n")
    argv = [a.format(spec=spec, bad=bad, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("colabjob: error: ")
    assert "Traceback" not in err


def test_start_refuses_an_existing_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_job(tmp_path, "job", segments=[(0, 5, S.BUDGET)])
    assert main(["start", str(_spec(tmp_path)), "--storage", str(tmp_path / "job")]) == 2
    assert "colabjob resume" in capsys.readouterr().err


def test_resume_refuses_a_held_lease(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = make_job(tmp_path, "job", segments=[(0, 5, S.BUDGET), (5, 0, None)])
    hold_lease(store, step=7)
    assert main(["resume", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err
    assert "already running on vm (colab, pid 4242" in err and "--force" in err


def test_resume_of_finished_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_job(tmp_path, "done", segments=[(0, 100, S.COMPLETED)])
    assert main(["resume", str(tmp_path / "done")]) == 0
    assert "already completed" in capsys.readouterr().err
    make_job(tmp_path, "gone", segments=[(0, 5, S.BUDGET)], final=JobEvent.CANCEL)
    assert main(["resume", str(tmp_path / "gone")]) == 2


def test_resume_refuses_exactness_breaking_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_job(tmp_path, "job", segments=[(0, 5, S.BUDGET)])
    assert main(["resume", str(tmp_path / "job"), "--set", "training.seed=7"]) == 2
    err = capsys.readouterr().err
    assert "training.seed" in err and "--force" in err


def test_stop_writes_a_request_for_the_live_runner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_job(tmp_path, "job", segments=[(0, 5, S.BUDGET), (5, 0, None)])
    lease = hold_lease(store, step=7)
    assert main(["stop", str(tmp_path / "job"), "--reason", "going home"]) == 0
    request = read_stop_request(store)
    assert request is not None and request.epoch == lease.epoch and not request.cancel
    assert request.reason == "going home"
    assert "asked the runner on vm" in capsys.readouterr().err
    assert load_record(store).state is JobState.RUNNING  # the runner moves it, not us


def test_stop_cancel_without_a_runner_cancels_now(tmp_path: Path) -> None:
    store = make_job(tmp_path, "job", segments=[(0, 5, S.BUDGET)])
    assert main(["stop", str(tmp_path / "job")]) == 0
    assert load_record(store).state is JobState.SUSPENDED
    assert main(["stop", str(tmp_path / "job"), "--cancel"]) == 0
    assert load_record(store).state is JobState.CANCELLED
    lost = make_job(tmp_path, "lost", segments=[(0, 5, None)])  # RUNNING; its VM vanished
    assert main(["stop", str(tmp_path / "lost"), "--cancel"]) == 0
    assert load_record(lost).state is JobState.CANCELLED


def test_gc_applies_retention_and_sweeps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_job(tmp_path, "job", segments=[(0, 40, S.BUDGET)], checkpoint=False)
    for step in (10, 20, 30, 40):
        save_checkpoint(store, step, metric_rows(1, step), keep=10)
    store.write_bytes("ckpt/000000000015-abandoned/w", b"partial")  # a crashed upload
    assert main(["gc", str(tmp_path / "job")]) == 0
    out = capsys.readouterr().out
    assert "deleted 2 checkpoint(s)" in out and "swept 1 abandoned" in out
    assert [i.step for i in CheckpointStore(store).list()] == [30, 40]
    assert "job storage in use" in out


def test_handoff_without_its_required_flags_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["handoff", "gs://b/jobs/x"]) == 2  # the gce engine checks its own flags
    err = capsys.readouterr().err
    assert "--project" in err and "--zone" in err and "--machine-type" in err


def test_status_json_of_a_created_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_job(tmp_path, "job", segments=[], checkpoint=False)
    assert main(["status", str(tmp_path / "job"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["state"], s["step"], s["segments"], s["eta_seconds"]) == ("created", None, 0, None)


def test_watchdog_returns_once_the_job_is_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_job(tmp_path, "job", segments=[(0, 100, S.COMPLETED)])
    assert main(["watchdog", str(tmp_path / "job"), "--refresh", "1s", "--budget", "1h"]) == 0
    out = capsys.readouterr().out
    assert "COMPLETED" in out and "step 100" in out and "\x1b[" not in out


def test_resume_with_a_safe_change_updates_the_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_job(tmp_path, "job", segments=[(0, 5, S.BUDGET)])
    before = load_record(store).config_hash
    # the entrypoint does not exist here: the segment fails at once (a user error, exit 2)
    code = main(["resume", str(tmp_path / "job"), "--set", "training.max_steps=300"])
    err = capsys.readouterr().err
    assert "changed training.max_steps: 100 -> 300" in err
    assert code == 2 and "entrypoint" in err
    record = load_record(store)
    assert record.config["training"]["max_steps"] == 300 and record.config_hash != before
