"""examples/colab_quickstart.ipynb runs top to bottom, so it cannot rot.

Executed with nbclient on CPU. The Colab modules are local stand-ins (a ``google.colab``
package made in tmp: ``drive.mount`` creates ``MyDrive`` under ``COLABJOB_DRIVE_ROOT``,
``auth.authenticate_user`` does nothing). The notebook's own spec is checked to load; then a
cell injected after it (as papermill injects parameters) swaps in a tiny ``python``-kind job
whose first session is ended by a SIGTERM to the runner (as Colab's stop button or the end
of a session would), so ``!colabjob start`` pauses (75), ``!colabjob resume`` completes
it, and ``colabjob plot`` draws both sessions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "colab_quickstart.ipynb"

pytestmark = pytest.mark.slow

FAKE_COLAB = {
    "__init__.py": '"""Stand-in for google.colab outside Colab (tests)."""\n',
    "drive.py": (
        "import os\n"
        "calls = []\n"
        "def mount(path, force_remount=False):\n"
        "    os.makedirs(os.path.join(path, 'MyDrive'), exist_ok=True)\n"
        "    open(os.path.join(path, 'mounted'), 'a').write('mount\\n')\n"
        "    print('Mounted at', path)\n"
        "def flush_and_unmount():\n"
        "    root = os.environ['COLABJOB_DRIVE_ROOT']\n"
        "    open(os.path.join(root, 'mounted'), 'a').write('flush\\n')\n"
    ),
    "auth.py": "def authenticate_user():\n    pass\n",
}

TINY_TRAIN = """
import os, signal, time
import torch
from colabjob.jobs.data import make_loader


def main(session, spec):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    loader = make_loader(torch.utils.data.TensorDataset(x, y), batch_size=4, seed=0)
    session.track(model=model, optimizer=opt, loader=loader)
    for xb, yb in session.batches():
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if session.step(loss=loss):
            return
        if session.global_step == 6 and not os.path.exists("first-session-over"):
            open("first-session-over", "w").close()
            os.kill(os.getppid(), signal.SIGTERM)  # the session ends: the runner checkpoints
            for _ in range(3000):  # until the signal is in: the segment stops at step 7
                if session.ctx.policy.should_stop() is not None:
                    break
                time.sleep(0.01)
"""

TINY_SPEC = """
job: {name: quickstart, kind: python, entrypoint: 'tiny_train:main'}
training: {max_steps: 12, log_every_steps: 1}
checkpoint: {every_steps: 4, every_minutes: null}
budget: {platform: colab, margin: 10m}
"""


def _inject(nb: Any) -> None:
    """After the spec cell: check the notebook's spec loads, then swap in the tiny job."""
    import nbformat

    index = next(i for i, c in enumerate(nb.cells) if "spec" in c.metadata.get("tags", []))
    check = nbformat.v4.new_code_cell(
        "from colabjob.config import load_spec\n"
        "_spec = load_spec('job.yaml')\n"
        "assert _spec.job.kind == 'lora', _spec\n"
        "print('notebook spec OK:', _spec.job.name)"
    )
    swap = nbformat.v4.new_code_cell(
        f"open('tiny_train.py', 'w').write({TINY_TRAIN!r})\n"
        f"open('job.yaml', 'w').write({TINY_SPEC!r})"
    )
    nb.cells[index + 1 : index + 1] = [check, swap]


def _text(cell: Any) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(str(out["data"].get("text/plain", "")))
    return "".join(parts)


def _cells(nb: Any, tag: str) -> list[Any]:
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    fakes = tmp_path / "fakes" / "google" / "colab"  # ``google`` stays a namespace package
    fakes.mkdir(parents=True)
    for name, text in FAKE_COLAB.items():
        (fakes / name).write_text(text)
    work, drive = tmp_path / "work", tmp_path / "drive"
    work.mkdir()
    drive.mkdir()
    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path / "fakes"), str(work), str(REPO)])
    )
    monkeypatch.setenv("COLABJOB_DRIVE_ROOT", str(drive))
    monkeypatch.setenv("COLAB_RELEASE_TAG", "colabjob-test")
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ.get("PATH", ""))
    for var in ("NO_COLOR", "CI", "COLABJOB_HOME"):
        monkeypatch.delenv(var, raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    _inject(nb)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    ).execute()

    job = drive / "MyDrive" / "colabjob" / "quickstart"
    assert f"the job lives at {job}" in _text(_cells(nb, "storage")[0])
    assert (drive / "mounted").read_text().splitlines()[0] == "mount"
    start = _text(_cells(nb, "start")[0])
    assert "paused at step 7 (signal)" in start and "colabjob resume" in start
    first, second = (_text(c) for c in _cells(nb, "status"))
    assert "state       SUSPENDED" in first and "step        7/12" in first
    assert "done at step 12" in _text(_cells(nb, "resume")[0])
    assert "state       COMPLETED" in second and "segments    2" in second
    plot = _cells(nb, "plot")[0]
    assert any("image/png" in out.get("data", {}) for out in plot.outputs)
    assert "1 session boundary" in _text(plot)
    assert (job / "job.json").exists()
    assert "flush" in (drive / "mounted").read_text()
