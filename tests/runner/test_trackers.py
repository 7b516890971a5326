"""Experiment trackers of a segment: TensorBoard event files in the job's storage whose
global step runs on across sessions, each step once (read back with TensorBoard's own
``EventAccumulator``), and a W&B run resumed every session.

W&B is exercised against a stand-in ``wandb`` module put on ``sys.path`` (the real package
is not installed here): it records the calls of the public API colabjob uses.
"""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

import colabjob
from colabjob.errors import ConfigError, ExitCode
from colabjob.jobs.session import Session
from colabjob.runner.record import load_record
from colabjob.runner.trackers import WANDB_ID_KEY
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore
from tests.fakes import FakeClock
from tests.jobs.helpers import train_tiny


def _train(s: Session, clock: FakeClock, *, crash_at: int | None = None) -> None:
    """``train_tiny`` with each step "taking" a minute, crashing before step ``crash_at``."""

    def crash(s: Session) -> None:
        if crash_at is not None and s.global_step + 1 == crash_at:
            raise RuntimeError("the VM went away")

    train_tiny(s, clock=clock, after=crash)


def _session(job: Path, clock: FakeClock, **kw: Any) -> Any:
    kw.setdefault("tensorboard", True)
    return colabjob.session(
        str(job), platform="local", session_started_at=clock.time(), every_steps=4,
        every_minutes=None, log_every_steps=2, max_steps=30, clock=clock, log=None, **kw,
    )  # fmt: skip


def test_tensorboard_steps_run_on_across_sessions_each_once(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job, clock = tmp_path / "job", FakeClock()
    with _session(job, clock, budget="15m", margin=60) as s:  # stops on the budget
        _train(s, clock)
    first = s.outcome
    assert first is not None and first.stop_reason == "budget" and 4 < first.last_step < 20
    # crash two steps after a checkpoint (every 4), right after logging a step (every 2)
    last = next(n for n in range(first.last_step + 3, 40) if n % 4 == 2)
    with pytest.raises(RuntimeError), _session(job, clock) as s:
        _train(s, clock, crash_at=last + 1)
    crashed = s.outcome
    assert crashed is not None and crashed.last_step == last
    assert crashed.checkpoint_step == last - 2  # step `last` was logged, and will be redone
    with _session(job, clock) as s:
        _train(s, clock)
    assert s.outcome is not None and s.outcome.completed

    files = sorted((job / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 3  # one per session
    acc = EventAccumulator(str(job / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == list(range(2, 31, 2))  # continuous, each step once
    store = open_store(str(job))
    info = CheckpointStore(store).latest()
    assert info is not None
    history = json.loads(CheckpointStore(store).read(info, "metrics.json"))
    committed = {row["step"]: row["loss"] for row in history}
    # the redone steps show the values of the run that committed them, not the crashed one's
    assert [pytest.approx(committed[e.step], rel=1e-6) for e in events] == [e.value for e in events]
    assert {"train/lr", "train/samples"} <= set(acc.Tags()["scalars"])


def test_tensorboard_files_reach_a_remote_store() -> None:
    url, clock = f"memory://tb-{uuid.uuid4().hex}", FakeClock()
    with colabjob.session(
        url, platform="local", max_steps=4, log_every_steps=2, clock=clock, log=None,
        tensorboard=True,
    ) as s:  # fmt: skip
        _train(s, clock)
    keys = [k for k in open_store(url).list("tensorboard")]
    assert len(keys) == 1 and "tfevents" in keys[0]


def test_tensorboard_rows_wait_for_the_upload_interval_then_all_go_up(tmp_path: Path) -> None:
    """The training loop only queues rows; each upload writes every queued row (the steps
    in order, each once) and copies the event file to the job's storage."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from colabjob.runner.trackers import TensorBoardSink

    now = [0.0]
    store = open_store(str(tmp_path / "job"))
    sink = TensorBoardSink(store, upload_every=60.0, monotonic=lambda: now[0])
    try:
        for step in range(1, 6):
            now[0] += 10.0
            sink.update(step, 10, {"loss": 1.0 / step, "deadline": 123.0})
        assert list(store.list("tensorboard")) == []  # 50 s: nothing written or uploaded yet
        now[0] += 10.0
        sink.update(6, 10, {"loss": 1.0 / 6})  # 60 s: the upload is due
        (key,) = list(store.list("tensorboard"))
        copy = tmp_path / "copy"
        copy.mkdir()
        (copy / key.rsplit("/", 1)[-1]).write_bytes(store.read_bytes(key))
        acc = EventAccumulator(str(copy))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
        assert acc.Tags()["scalars"] == ["train/loss"]  # session keys are not metrics
    finally:
        sink.close()


WANDB_STAND_IN = '''
"""A stand-in for the wandb package: records the calls colabjob makes."""
CALLS = []


class Run:
    def __init__(self, kwargs):
        self.kwargs = kwargs

    def log(self, data, step=None):
        CALLS.append(("log", dict(data), step))

    def finish(self):
        CALLS.append(("finish", self.kwargs["id"]))


def init(**kwargs):
    CALLS.append(("init", kwargs))
    return Run(kwargs)
'''


@pytest.fixture
def fake_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    site = tmp_path / "site"
    site.mkdir()
    (site / "wandb.py").write_text(textwrap.dedent(WANDB_STAND_IN))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    import wandb  # the stand-in

    yield wandb
    monkeypatch.delitem(sys.modules, "wandb", raising=False)


def test_wandb_resumes_one_run_per_job_every_session(tmp_path: Path, fake_wandb: Any) -> None:
    job, clock = tmp_path / "job", FakeClock()
    with _session(job, clock, budget="15m", margin=60, wandb=True, tensorboard=False) as s:
        _train(s, clock)
    stopped = s.outcome
    assert stopped is not None and stopped.stop_reason == "budget"
    with _session(job, clock, wandb=True, wandb_project="demo-runs", tensorboard=False) as s:
        _train(s, clock)
    run_id = load_record(open_store(str(job))).extras[WANDB_ID_KEY]
    inits = [c[1] for c in fake_wandb.CALLS if c[0] == "init"]
    assert [(i["id"], i["resume"]) for i in inits] == [(run_id, "allow")] * 2
    assert [i["project"] for i in inits] == ["colabjob", "demo-runs"]
    assert all(i["dir"] and i["name"] == "job" for i in inits)
    assert inits[0]["config"] == {}  # session(): the config it was given (none)
    logged = [c for c in fake_wandb.CALLS if c[0] == "log"]
    assert [c[2] for c in logged] == list(range(2, 31, 2))  # the job's global step
    assert {"loss", "lr", "samples"} <= logged[0][1].keys() and "deadline" not in logged[0][1]
    assert [c[0] for c in fake_wandb.CALLS].count("finish") == 2


def test_missing_packages_are_clear_errors_before_anything_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    job, clock = tmp_path / "job", FakeClock()
    # in a script a usage error is the CLI's one line on stderr and exit 2
    with pytest.raises(SystemExit) as info, _session(job, clock, wandb=True):
        pass
    assert info.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.startswith("colabjob: error: ") and "wandb package" in err
    assert "pip install wandb" in err and "Traceback" not in err
    assert not (job / "job.json").exists()
    monkeypatch.setattr("colabjob.runner.script_errors.interactive", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    with pytest.raises(ConfigError, match="tensorboard package"), _session(job, clock):
        pass  # in a notebook the error itself is raised
    lines: list[str] = []
    with colabjob.session(
        str(job), platform="local", max_steps=2, clock=clock, log=lines.append
    ) as s:  # tensorboard="auto": a note, and training goes on
        _train(s, clock)
    assert s.outcome is not None and s.outcome.completed
    assert any("TensorBoard logs off" in line and "pip install" in line for line in lines)
