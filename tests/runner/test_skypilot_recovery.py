"""A simulated SkyPilot recovery: the rendered task's ``run`` script, executed with bash and
SkyPilot's node variables against the GCS emulator and a fake GCE metadata server, is
SIGKILLed (the whole "cluster": its process group) after a committed checkpoint, then run
again as SkyPilot's relaunch would; the job completes with final weights equal to an
uninterrupted run's. Only SkyPilot's controller (which decides to relaunch) is not here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colabjob.runner.handoff.skypilot import SkyTask, render_task
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.cli.builders import run_cli
from tests.runner.fake_metadata import fake_metadata
from tests.runner.vm_stubs import REPO, write_exe

pytestmark = [pytest.mark.slow, pytest.mark.gcs]

TRAIN = """
import os, signal, time
import torch
from colabjob.jobs.data import make_loader


def main(session, spec):
    args = spec.job.args
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    session.track(model=model, optimizer=opt, loader=make_loader(data, batch_size=4, seed=0))
    marker = args["marker"]
    for x, y in session.batches():
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if session.step(loss=loss):
            break
        step = session.global_step
        if step == args["pause_at"] and not os.path.exists(marker + ".paused"):
            open(marker + ".paused", "w").close()  # the Colab session ends
            os.kill(os.getppid(), signal.SIGTERM)
        elif step >= 7 and args["pause_at"] and not os.path.exists(marker + ".restarted"):
            open(marker + ".slow", "w").close()  # the test now kills the cluster
            time.sleep(0.2)
    if session.global_step >= spec.training.max_steps:
        torch.save(model.state_dict(), args["out"])
"""

SPEC = """
job:
  name: sky-recovery
  kind: python
  entrypoint: tiny_train:main
  args: {{marker: {marker}, pause_at: {pause_at}, out: {out}}}
training: {{max_steps: 30, log_every_steps: 1}}
checkpoint: {{every_steps: 5, every_minutes: null}}
budget: {{platform: local}}
"""

COLABJOB = f"""#!{sys.executable}
import sys
from colabjob.cli import main
sys.exit(main())
"""


def _spec(tmp_path: Path, name: str, *, pause_at: int | None) -> Path:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(SPEC.format(marker=tmp_path / name, pause_at=pause_at or "null",
                                out=tmp_path / f"{name}.pt"))
    return spec


def test_a_killed_cluster_relaunched_finishes_like_an_uninterrupted_run(
    gcs_bucket: str, tmp_path: Path
) -> None:
    import torch

    (tmp_path / "tiny_train.py").write_text(TRAIN)
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    ref = run_cli("start", str(_spec(tmp_path, "ref", pause_at=None)), "--storage",
                  f"{gcs_bucket}/ref", env=env)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    url = f"{gcs_bucket}/job"
    out = run_cli("start", str(_spec(tmp_path, "job", pause_at=3)), "--storage", url, env=env)
    assert out.returncode == 75, out.stdout + out.stderr  # paused in "Colab" at step 3
    store = open_store(url)

    task = render_task(SkyTask(name="colabjob-job", job_url=url, version="0", nodes=1))
    script = write_exe(tmp_path / "run.sh", task["run"])
    bin_dir = tmp_path / "bin"
    write_exe(bin_dir / "colabjob", COLABJOB)
    with fake_metadata(preemptible=True) as meta:
        run_env = {**os.environ, **env, **task["envs"], "PATH": f"{bin_dir}:{os.environ['PATH']}",
                   "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_RANK": "0",
                   "SKYPILOT_NODE_IPS": "127.0.0.1", "GCE_METADATA_HOST": meta.host}
        first = subprocess.Popen(["bash", str(script)], env=run_env, start_new_session=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            committed = None
            for _ in range(12000):  # until a checkpoint past the Colab one is committed
                latest = CheckpointStore(store).latest()
                if latest is not None and latest.step > 3 and (tmp_path / "job.slow").exists():
                    committed = latest.step
                    break
                if first.poll() is not None:
                    break
                time.sleep(0.01)
            assert committed is not None, first.communicate()[0]
            os.killpg(first.pid, signal.SIGKILL)  # the cluster vanishes
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
        assert not (tmp_path / "job.pt").exists()

        (tmp_path / "job.restarted").touch()
        second = subprocess.run(["bash", str(script)], env=run_env, capture_output=True,
                                text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    record = load_record(store)
    assert record.state is JobState.COMPLETED
    assert record.history[-1].first_step > committed  # resumed from the cluster's commit
    got = torch.load(tmp_path / "job.pt", weights_only=True)
    want = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), (got, want)
