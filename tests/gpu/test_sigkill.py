"""SIGKILL on a GPU: with ``torch.use_deterministic_algorithms(True)`` the resumed job ends
bit-identical to an uninterrupted one.

``gpu_child`` (fp16 autocast with a ``GradScaler``, dropout, AdamW, accumulation 2, through
``colabjob.session``: record, lease, watchdog, background commits) runs once straight and
once as a chain of children: the first SIGKILLs itself right after its second checkpoint's
manifest is created (on the upload thread), the second resumes there with other seeds and
SIGKILLs itself in the middle of the second accumulation window it trains, the third takes
the expired lease over and completes the job. Each child must resume at the newest
committed checkpoint. Weights, optimizer and scaler state and the metrics history must
equal the straight run's bit for bit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore
from tests.gpu.gpu_child import assert_same, load_final

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOTAL = 12  # optimizer steps, a checkpoint every 2
CHILD_TIMEOUT = 300.0
ENV = {**os.environ, "PYTHONPATH": str(REPO), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def _newest_step(store: Path) -> int:
    info = CheckpointStore(open_store(store)).latest() if store.exists() else None
    return 0 if info is None else info.step


def _child(store: Path, out: Path, *, kill: str = "none", init_seed: int = 0) -> int:
    """Run one segment to its end or its ``kill``; returns the step it resumed at, which
    must be the newest committed checkpoint's."""
    newest = _newest_step(store)
    cmd = [
        sys.executable, "-m", "tests.gpu.gpu_child", str(store), "--total", str(TOTAL),
        "--every", "2", "--precision", "fp16", "--kill", kill, "--init-seed", str(init_seed),
        "--out", str(out), "--slow", "0.05",
    ]  # fmt: skip
    got = subprocess.run(
        cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=CHILD_TIMEOUT
    )
    ready = re.search(r"^ready (\d+)$", got.stdout, flags=re.M)
    assert ready is not None, f"{kill}: rc={got.returncode}\n{got.stderr[-3000:]}"
    want = 0 if kill == "none" else -signal.SIGKILL
    assert got.returncode == want, f"{kill}: rc={got.returncode}\n{got.stderr[-3000:]}"
    if kill != "none":
        assert "killing myself at" in got.stderr, got.stderr[-3000:]
    assert int(ready.group(1)) == newest, (kill, ready.group(1), newest)
    return newest


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    _child(tmp_path / "straight", tmp_path / "straight.pt")
    store, out = tmp_path / "job", tmp_path / "job.pt"
    resumed_at = [
        _child(store, out, kill=kill, init_seed=seed)
        for kill, seed in [("committed:2", 0), ("step:3", 1000), ("none", 2000)]
    ]
    # the first resume is mid-job (its 3rd micro-batch is mid-window of a step <= TOTAL)
    assert resumed_at[0] == 0 and 0 < resumed_at[1] <= TOTAL - 2, resumed_at
    want, got = load_final(tmp_path / "straight.pt"), load_final(out)
    assert len(want["metrics"]) == TOTAL and want["scaler"]["scale"] > 0
    assert_same(want, got, "final")

    record = load_record(open_store(store))
    assert record.state is JobState.COMPLETED and record.history[-1].last_step == TOTAL
    reasons = [s.stop_reason.value if s.stop_reason else None for s in record.history]
    assert reasons == ["crash", "crash", "completed"]
