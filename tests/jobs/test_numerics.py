"""oneMKL in its reproducible mode: ``import colabjob`` asks for CNR before torch's first
matrix product (a user's ``MKL_CBWR`` wins) and a training segment turns oneMKL's dynamic
threading off. Read off oneMKL itself (``MKL_VERBOSE=1`` prints the mode of every call)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.cli.builders import REPO

HAS_MKL = torch.backends.mkl.is_available()


def _mkl_modes(code: str, **env: str) -> list[tuple[str, str]]:
    full = {**os.environ, "PYTHONPATH": str(REPO), "MKL_VERBOSE": "1", **env}
    if "MKL_CBWR" not in env:
        full.pop("MKL_CBWR", None)  # what a user's shell has: nothing
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return re.findall(r"SGEMM\(.*CNR:(\w+) Dyn:(\d)", out.stdout)


MATMUL = "import torch; a = torch.randn(64, 64); a @ a\n"


@pytest.mark.skipif(not HAS_MKL, reason="this torch build has no oneMKL (not x86-64)")
def test_import_colabjob_asks_onemkl_for_reproducible_results() -> None:
    assert _mkl_modes(MATMUL)[0][0] == "OFF"  # oneMKL's own default, without colabjob
    assert _mkl_modes("import colabjob\n" + MATMUL)[0][0] == "AUTO"
    chosen = _mkl_modes("import colabjob\n" + MATMUL, MKL_CBWR="COMPATIBLE")
    assert chosen[0][0] == "COMPATIBLE"


@pytest.mark.skipif(not HAS_MKL, reason="this torch build has no oneMKL (not x86-64)")
def test_a_segment_turns_onemkl_dynamic_threading_off() -> None:
    before = _mkl_modes(MATMUL)
    after = _mkl_modes(
        "import colabjob, torch\nn = torch.get_num_threads()\n"
        "from colabjob.jobs.numerics import pin_threads\npin_threads()\n"
        "assert torch.get_num_threads() == n\n" + MATMUL
    )
    assert before[0][1] == "1" and after[0][1] == "0"


def test_a_resume_on_another_cpu_thread_count_says_it_is_not_exact(tmp_path: Path) -> None:
    """On a CPU the intra-op threads split every sum: the checkpoint records the count, and
    a restore with another one warns with the setting that makes it exact again."""
    from colabjob.jobs.state.capture import snapshot, write_snapshot
    from colabjob.jobs.state.format import Counters
    from colabjob.jobs.state.restore import restore
    from colabjob.jobs.state.tracked import Tracked

    n = torch.get_num_threads()
    write_snapshot(snapshot(Tracked(model=torch.nn.Linear(4, 4)), counters=Counters(step=1)),
                   tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same count: nothing to say
        restore(tmp_path, Tracked(model=torch.nn.Linear(4, 4)))
    torch.set_num_threads(n + 1)
    try:
        with pytest.warns(RuntimeWarning, match=f"OMP_NUM_THREADS={n} for an exact resume"):
            restore(tmp_path, Tracked(model=torch.nn.Linear(4, 4)))
    finally:
        torch.set_num_threads(n)
