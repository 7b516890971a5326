"""A loader worker never outlives the process it serves.

The main process SIGKILLs itself while its (``spawn``ed) worker is still unpickling the
dataset, so the worker reaches ``quiet_workers``' init, and torch's own parent watch, only
after its parent is gone (torch's watch would then record pid 1 and wait forever, holding
the dead process's stdout and stderr). The worker must exit on its own within seconds.
Workers are found by an environment marker only they and the child carry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARKER = "COLABJOB_ORPHAN_TEST"


def _marked(value: str) -> list[int]:
    """Pids of live processes whose environment holds ``MARKER=value``."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_worker_whose_parent_died_before_it_started_exits(tmp_path: Path) -> None:
    value = uuid.uuid4().hex
    started = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(REPO), MARKER: value, "SLOW_UNPICKLE_S": "3",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.jobs.orphan_child", str(started)],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL and started.exists()
    deadline = time.monotonic() + 30  # 3 s of unpickling, then at most a second's poll
    left = _marked(value)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _marked(value)
    for pid in left:  # never leave one behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"loader worker(s) {left} outlived their SIGKILLed parent"
