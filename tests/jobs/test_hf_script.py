"""A job made by a run_clm-like script (``hf_clm_child.py``: HF's ``run_clm.py`` shape plus
the two lines of ``colabjob.hf.resumable``), tried as a new user would:

- paused by a signal at a step that is not a logging step, the script's last word is
  colabjob's "paused" (HF's "Training completed" banner is not logged); ``colabjob status``
  reads the job (kind, step of the newest commit, total from ``max_steps``, an ETA) and
  ``colabjob resume`` says to rerun the script (exit 2);
- rerun with another learning rate, it says once that the change is ignored (the
  checkpoint's optimizer wins), says which step it resumes from, and ends with the same
  ``train_loss`` (the mean over the whole job) and weights as an uninterrupted run;
- a completed job rerun with the same ``max_steps`` trains nothing and leaves
  ``output_dir``'s trainer state the finished run's; with a larger ``max_steps`` it continues
  to exactly where an uninterrupted run with that ``max_steps`` ends;
- a newest checkpoint that verifies but does not load (an ``optimizer.pt`` that would need
  unpickling, its manifest rewritten to match) is quarantined with one warning when the
  script is rerun once, which resumes from the previous checkpoint in the same process and
  ends with the weights and loss of an uninterrupted run.

``train_loss`` is compared for equality: on CPU the resumed run adds the same per-step
losses to the same restored running sum in the same order, so the float is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from colabjob.jobs.demo import compare_final_weights
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.jobs.kind_fixtures import tiny_model_dir, write_text_data

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
WAIT = 240.0  # a bound for a child to finish; never a deadline under test
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-script-assets")
    data = write_text_data(root / "data", docs=30, words=40)
    assets = {"data": data, "model": tiny_model_dir(root / "model", data)}
    code, out = _script(root / "straight", assets, root / "o", max_steps=6)
    assert code == 0, out[-3000:]
    assets["straight"] = root / "straight"  # an uninterrupted 6-step job
    assets["straight_out"] = root / "o"
    return assets


def _script(
    url: Path, assets: dict[str, Path], out: Path, *, max_steps: int, lr: float = 2e-3,
    pause_at: int = 0, every: int | None = None,
) -> tuple[int, str]:  # fmt: skip
    cmd = [sys.executable, "-m", "tests.jobs.hf_clm_child", str(url), str(assets["model"]),
           str(assets["data"]), str(out), str(max_steps), str(lr), str(pause_at)]  # fmt: skip
    cmd += [] if every is None else [str(every)]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=WAIT)
    return proc.returncode, proc.stdout + proc.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "colabjob.cli", *args]
    return subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=WAIT)


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def _trainer_state(out: Path) -> dict:
    return json.loads((out / "hf" / "trainer_state.json").read_text())


def test_paused_script_job_reads_in_the_cli_and_resumes_to_the_jobs_mean_loss(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    job, out = tmp_path / "job", tmp_path / "out"
    code, text = _script(job, assets, out, max_steps=6, pause_at=3)  # logging_steps is 4
    assert code == 75, text[-3000:]
    assert "Training completed" not in text
    lines = [line for line in text.splitlines() if line.startswith("colabjob:")]
    assert lines[-1].startswith("colabjob: paused at step 3"), lines

    status = _cli("status", str(job), "--json")
    assert status.returncode == 0, status.stderr
    got = json.loads(status.stdout)
    assert (got["kind"], got["step"], got["checkpoint_step"], got["total"]) == (
        "hf-trainer", 3, 3, 6,
    )  # fmt: skip
    assert got["eta_seconds"] is not None and got["eta_seconds"] > 0
    resume = _cli("resume", str(job))
    assert resume.returncode == 2
    assert "running that script again" in resume.stderr
    assert "unknown key" not in resume.stderr

    code, text = _script(job, assets, out, max_steps=6, lr=1e-3)  # another learning rate
    assert code == 0, text[-3000:]
    assert "colabjob: resuming from checkpoint step 3" in text
    assert text.count("training_args.learning_rate: 0.002 -> 0.001 is ignored") == 1
    straight = _result(assets["straight_out"])
    assert _result(out)["training_loss"] == straight["training_loss"]
    assert _result(out)["metrics"]["train_loss"] == straight["metrics"]["train_loss"]
    assert compare_final_weights(assets["straight"], job)


def test_completed_job_keeps_its_state_and_continues_to_a_larger_max_steps(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    job, out = tmp_path / "job", tmp_path / "out"
    code, text = _script(job, assets, out, max_steps=4)
    assert code == 0, text[-3000:]
    first = _result(out)

    code, text = _script(job, assets, out, max_steps=4)  # rerun: nothing to train
    assert code == 0, text[-3000:]
    assert "job already completed at step 4" in text
    state = _trainer_state(out)
    assert state["global_step"] == 4 and state["log_history"]  # not an empty state
    assert _result(out)["metrics"]["train_loss"] == first["metrics"]["train_loss"]

    code, text = _script(job, assets, out, max_steps=6)  # a larger max_steps continues
    assert code == 0, text[-3000:]
    assert "colabjob: resuming from checkpoint step 4" in text
    record = load_record(open_store(job))
    assert record.state is JobState.COMPLETED and record.last_step == 6
    assert _trainer_state(out)["global_step"] == 6
    assert _result(out)["training_loss"] == _result(assets["straight_out"])["training_loss"]
    assert compare_final_weights(assets["straight"], job)


class _Evil:
    """Unpickling this would run a command: it must never be executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _plant_pickled_optimizer(ckpt: Path, marker: Path) -> None:
    """The checkpoint's optimizer state becomes an older checkpoint's ``optimizer.pt`` that
    would run code when unpickled; ``state.json`` and the manifest are rewritten to match,
    so every byte still verifies."""
    state = json.loads((ckpt / "state.json").read_text())
    del state["optimizer_file"]  # only the older format reads optimizer.pt
    files = {
        "optimizer.pt": pickle.dumps({"optimizer": _Evil(marker)}),
        "state.json": json.dumps(state).encode(),
    }
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def test_unloadable_newest_checkpoint_falls_back_in_the_same_run(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    job, out = tmp_path / "job", tmp_path / "out"
    code, text = _script(job, assets, out, max_steps=6, pause_at=3, every=2)
    assert code == 75, text[-3000:]
    checkpoints = CheckpointStore(open_store(job))
    two, three = checkpoints.list()
    assert (two.step, three.step) == (2, 3)
    pwned = tmp_path / "pwned"
    _plant_pickled_optimizer(job / three.prefix, pwned)
    assert checkpoints.latest(verify="full") == three  # it verifies

    code, text = _script(job, assets, out, max_steps=6)  # one rerun, no supervisor
    assert code == 0, text[-3000:]
    assert not pwned.exists()  # refused, never unpickled
    # one report (the log line; a script also sees the CorruptCheckpointWarning copy that
    # library callers may catch, as on the Session path), not one per attempt
    reports = [ln for ln in text.splitlines() if ln.startswith(f"checkpoint ckpt/{three.dirname}")]
    assert len(reports) == 1 and "quarantined to quarantine/" in reports[0], text[-3000:]
    reason = json.loads((job / "quarantine" / three.dirname / "reason.json").read_text())
    assert reason["problem"].startswith("does not load")
    assert "colabjob: resuming from checkpoint step 2" in text
    assert "resuming from checkpoint step 3" not in text
    record = load_record(open_store(job))
    assert record.state is JobState.COMPLETED and record.last_step == 6
    assert record.history[-1].first_step == 2
    straight = _result(assets["straight_out"])
    assert _result(out)["training_loss"] == straight["training_loss"]
    assert compare_final_weights(assets["straight"], job)
