"""SIGKILL at random moments, mid-save included: the resumed job ends bit-identical.

Each case runs ``equiv_child`` (the Session API through ``colabjob.session``: record, lease,
watchdog, async checkpoints) once straight and once as a chain of children that die by
SIGKILL at seeded random points: inside a checkpoint file upload (on the background upload
thread for periodic checkpoints), just before or just after a manifest is created, after
a random micro-batch, or after a random delay chosen by the parent. Each new child takes the
expired lease over and resumes from the newest committed checkpoint; the chain ends when a
job is complete. The job's result, its final committed checkpoint, must equal the straight
run's: weights and optimizer state (``torch.equal`` on every tensor) and the metrics history
(every step's loss, lr, epoch and sample count).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colabjob.jobs.state.restore import read_optimizer_state
from colabjob.runner.record import load_record, read_record
from colabjob.runner.states import JobState
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOTAL = 16  # optimizer steps; a checkpoint every 2
CHILD_TIMEOUT = 120.0


def _cmd(store: Path, config: str, kill: str = "none") -> list[str]:
    return [
        sys.executable, "-m", "tests.jobs.equiv_child", str(store),
        "--config", config, "--total", str(TOTAL), "--every", "2", "--kill", kill,
    ]  # fmt: skip


def _popen(cmd: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _plan(rng: random.Random) -> list[str]:
    """1 to 4 kills. The first lands inside a save after the first commit (a put of the
    second checkpoint, a later manifest), so the next child surely resumes mid-job."""
    first = rng.choice([f"put:{rng.randint(6, 12)}", f"manifest:{rng.randint(2, 4)}"])
    others = [
        rng.choice(
            [
                f"put:{rng.randint(1, 10)}",
                f"manifest:{rng.randint(1, 3)}",
                f"committed:{rng.randint(1, 3)}",
                f"step:{rng.randint(1, 30)}",
                f"timer:{rng.uniform(0.0, 0.25):.2f}",
            ]
        )
        for _ in range(rng.randint(0, 3))
    ]
    return [first, *others]


def _run_child(store: Path, config: str, kill: str) -> tuple[int, str, str]:
    if not kill.startswith("timer:"):
        proc = _popen(_cmd(store, config, kill))
        stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT)
        return proc.returncode, stdout, stderr
    proc = _popen(_cmd(store, config))
    assert proc.stdout is not None
    ready = proc.stdout.readline()  # the child has restored and is about to train
    time.sleep(float(kill.partition(":")[2]))  # a random moment, not a deadline
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT)
    return proc.returncode, ready + stdout, stderr


def _newest_step(store: Path) -> int:
    if not store.exists():
        return 0
    info = CheckpointStore(open_store(store)).latest()
    return 0 if info is None else info.step


def _completed(store: Path) -> bool:
    got = read_record(open_store(store)) if store.exists() else None
    return got is not None and got[0].state is JobState.COMPLETED


def _final_checkpoint(store: Path, into: Path) -> dict[str, object]:
    ckpts = CheckpointStore(open_store(store))
    info = ckpts.fetch_latest(into)
    assert info is not None and info.step == TOTAL
    return {
        "model": load_file(str(into / "model.safetensors")),
        "optimizer": read_optimizer_state(into),
        "metrics": (into / "metrics.json").read_text(),
    }


def _assert_equal(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, type(a)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    ("config", "seed"),
    [
        ("workers", 33),
        ("iterable", 18),
        ("map", 20),
        ("shuffled", 12),
        ("shuffled-workers", 5),
    ],
)
def test_sigkill_at_random_moments_is_bit_identical(tmp_path: Path, config: str, seed: int):
    """``workers``: map-style, 2 loader workers, accumulation 4; ``iterable``: an HF
    IterableDataset; ``map``: map-style in-process; ``shuffled``: a ``ShuffledStream`` over
    an HF IterableDataset in-process; ``shuffled-workers``: one over a ``ShardedStream``
    with 2 loader workers (a buffer each, shard order reshuffled per epoch). All: dropout,
    AdamW, warmup LambdaLR, a GradScaler, and losses drawing from Python's and NumPy's
    global RNGs."""
    rng = random.Random(seed)
    straight = _popen(_cmd(tmp_path / "straight", config))  # runs alongside the chain
    store = tmp_path / "job"
    runs: list[tuple[str, int, str]] = []
    resumed_at: list[int] = []
    for kill in [*_plan(rng), "none"]:
        if _completed(store):  # a kill that landed after the job completed
            break
        newest = _newest_step(store)
        rc, stdout, stderr = _run_child(store, config, kill)
        assert rc in (0, -signal.SIGKILL), f"{kill}: rc={rc}\n{stderr[-3000:]}"
        assert f"ready {newest}\n" in stdout, (newest, stdout, stderr[-2000:])
        runs.append((kill, rc, stderr))
        resumed_at.append(newest)
    assert runs[0][1] == -signal.SIGKILL and "killing myself at" in runs[0][2], runs[0]
    assert max(resumed_at) > 0, (resumed_at, runs)  # some child resumed mid-job

    rc = straight.wait(timeout=CHILD_TIMEOUT)
    assert rc == 0, straight.stderr.read() if straight.stderr else rc
    want = _final_checkpoint(tmp_path / "straight", tmp_path / "want")
    got = _final_checkpoint(store, tmp_path / "got")
    _assert_equal(want["model"], got["model"], "model")
    _assert_equal(want["optimizer"], got["optimizer"], "optimizer")
    assert got["metrics"] == want["metrics"]
    assert want["metrics"].count('"loss"') == TOTAL  # type: ignore[attr-defined]

    record = load_record(open_store(store))
    assert record.state is JobState.COMPLETED and record.history[-1].last_step == TOTAL
    reasons = [s.stop_reason.value if s.stop_reason else None for s in record.history]
    assert reasons == ["crash"] * (len(runs) - 1) + ["completed"]
