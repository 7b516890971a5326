"""The startup script with the real ``colabjob resume`` on the GCS emulator and a fake GCE.

A tiny ``python``-kind job is started as in Colab (``colabjob start``) and paused by a
SIGTERM. The VM's first boot runs the startup script: the job resumes with the GCE profile;
the fake metadata server announces a preemption; the runner commits a checkpoint and exits
75; the script leaves the VM to GCE (no power-off) and logs how to restart it. The second
boot (after ``gcloud compute instances start``) resumes again, completes, and calls the
stub ``shutdown``. In a managed instance group (``--restart-on-preemption``) the same run
ends with the stub ``gcloud`` resizing the group to 0 instead, and the preemption leaves the
VM to the group (which recreates it: the second boot). Only the VM itself (pip, the GPU
driver, a real ACPI shutdown) is faked.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import colabjob
from colabjob.jobs.policy import StopReason
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.cli.builders import run_cli
from tests.runner.fake_metadata import fake_metadata
from tests.runner.test_startup_script import RESIZE_0, render
from tests.runner.vm_stubs import REPO, FakeVm, write_exe

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
    paused, noticed = args["marker"] + ".paused", args["marker"] + ".notice"
    for x, y in session.batches():
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if session.step(loss=loss):
            return
        step = session.global_step
        if step == args["pause_at"] and not os.path.exists(paused):
            open(paused, "w").close()  # the Colab session ends: the supervisor gets SIGTERM
            os.kill(os.getppid(), signal.SIGTERM)
        elif step >= args["notice_at"] and os.path.exists(paused):
            if not os.path.exists(noticed):
                open(noticed, "w").close()  # first VM boot: the test now preempts the VM
            if not os.path.exists(args["marker"] + ".restarted"):
                time.sleep(0.5)  # slow steps until the runner reacts to the notice
"""

SPEC = """
job:
  name: handoff-e2e
  kind: python
  entrypoint: tiny_train:main
  args: {{marker: {marker}, pause_at: 5, notice_at: 10}}
training: {{max_steps: 60, log_every_steps: 1}}
checkpoint: {{every_steps: 25, every_minutes: null}}
budget: {{platform: local}}
"""

REAL_COLABJOB = f"""#!{sys.executable}
import sys
from colabjob.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("mig", [None, "colabjob-run1"], ids=["vm", "managed-group"])
def test_the_vm_resumes_is_preempted_restarts_and_powers_off(
    gcs_bucket: str, tmp_path: Path, mig: str | None
) -> None:
    (tmp_path / "tiny_train.py").write_text(TRAIN)
    marker = tmp_path / "marker"
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.format(marker=marker))
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}

    # In Colab: started, then the session ends (SIGTERM) -> paused with a checkpoint.
    out = run_cli("start", str(spec), "--storage", gcs_bucket, env=env)
    assert out.returncode == 75, out.stdout + out.stderr
    store = open_store(gcs_bucket)
    assert load_record(store).state is JobState.SUSPENDED

    vm = FakeVm(tmp_path / "vm", installed=colabjob.__version__)
    write_exe(vm.venv / "bin" / "colabjob", REAL_COLABJOB)
    script = render(job_url=gcs_bucket, mig=mig)

    # First boot on the spot VM: resumes, then GCE announces a preemption.
    with fake_metadata(preemptible=True) as meta:
        proc = vm.popen(script, GCE_METADATA_HOST=meta.host, **env)
        try:
            for _ in range(12000):  # until the job reaches the notice step (an event)
                if Path(f"{marker}.notice").exists() or proc.poll() is not None:
                    break
                time.sleep(0.01)
            meta.preempt()
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stdout + vm.log
    record = load_record(store)
    last = record.history[-1]
    assert record.state is JobState.SUSPENDED, vm.log
    assert (last.platform, last.stop_reason) == ("gce", StopReason.PREEMPTION), vm.log
    latest = CheckpointStore(store).latest(verify="full")
    assert latest is not None and latest.step >= 10  # committed at the notice
    assert "this spot VM was preempted" in vm.log
    if mig is None:
        assert "compute instances start" in vm.log
    else:
        assert f"the managed instance group {mig} recreates it" in vm.log
    assert vm.shutdowns == [] and vm.gcloud_calls == []  # GCE stops/deletes it itself

    # Second boot (`gcloud compute instances start`): resumes and completes, then powers off.
    Path(f"{marker}.restarted").touch()
    with fake_metadata(preemptible=True) as meta:
        done = vm.run(script, GCE_METADATA_HOST=meta.host, **env)
    assert done.returncode == 0, done.stdout + vm.log
    record = load_record(store)
    assert record.state is JobState.COMPLETED, vm.log
    assert record.history[-1].stop_reason is StopReason.COMPLETED
    assert "job completed" in vm.log
    if mig is None:
        assert vm.shutdowns == ["-h now"] and vm.gcloud_calls == []
    else:  # powering off would make the group recreate the VM: it shrinks the group instead
        assert vm.shutdowns == [] and vm.gcloud_calls == [RESIZE_0]
