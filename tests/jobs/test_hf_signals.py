"""Signals to a whole process group, the way SLURM and process managers send them, against
a run_clm-like HF script (``hf_signal_child.py``: ``dataloader_num_workers=2``) made
resumable with ``colabjob.hf.resumable``:

- SIGTERM to the group mid-training: the loader workers ignore it (they would otherwise
  die and crash the main process with "DataLoader worker ... is killed by signal"), the
  main process checkpoints at the next step boundary and exits 75; run again, the job
  completes bit-identical to an uninterrupted run;
- SIGTERM to the group after ``train()`` returned, during ``save_model``: the job is
  COMPLETED, so the signal is noted and the script still exits 0 with the model saved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colabjob.jobs.demo import compare_final_weights
from colabjob.jobs.policy import StopReason
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.jobs.kind_fixtures import tiny_model_dir, write_text_data

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
WAIT = 240.0  # a bound for a child to get somewhere; never a deadline under test


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-signal-assets")
    data = write_text_data(root / "data", docs=30, words=40)
    return {"data": data, "model": tiny_model_dir(root / "model", data)}


def _script(url: Path, assets: dict[str, Path], out: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tests.jobs.hf_signal_child", str(url), str(assets["model"]),
           str(assets["data"]), str(out), mode]  # fmt: skip
    # its own process group (its session), as a job under SLURM
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, err


def test_group_sigterm_pauses_with_loader_workers_and_one_after_completion_is_survived(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    code, err = _finish(_script(tmp_path / "straight", assets, tmp_path / "o1", "none"))
    assert code == 0, err[-3000:]

    proc = _script(tmp_path / "job", assets, tmp_path / "o2", "wait@3")
    for _ in range(int(WAIT * 100)):  # until step 3 ended (a bound, not a timing)
        if (tmp_path / "o2" / "ready").exists() or proc.poll() is not None:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its 2 loader workers
    code, err = _finish(proc)
    assert code == 75, err[-3000:]
    assert "killed by signal" not in err
    store = open_store(tmp_path / "job")
    record = load_record(store)
    assert record.state is JobState.SUSPENDED
    assert record.history[-1].stop_reason is StopReason.SIGNAL
    info = CheckpointStore(store).latest()
    assert info is not None and info.step == 3  # the boundary the signal arrived at
    assert not (tmp_path / "o2" / "model").exists()  # the code after train() did not run

    code, err = _finish(_script(tmp_path / "job", assets, tmp_path / "o3", "term-in-save"))
    assert code == 0, err[-3000:]
    assert "received SIGTERM after the job completed; finishing" in err
    outcome = json.loads((tmp_path / "o3" / "outcome.json").read_text())
    assert outcome["completed"] and outcome["first_step"] == info.step
    assert (tmp_path / "o3" / "model" / "model.safetensors").stat().st_size > 0
    assert load_record(store).state is JobState.COMPLETED
    assert compare_final_weights(tmp_path / "straight", tmp_path / "job")
