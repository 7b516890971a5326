"""The VM startup script: valid bash (``bash -n``, shellcheck), and it really runs here.

The script is executed by bash against stand-ins for the VM (``vm_stubs.FakeVm``): a stub
``shutdown`` that records its call, a stub ``colabjob`` whose exit code each test chooses,
the fake GCE metadata server on 127.0.0.1, and for one test a probe that reads the job from
the GCS emulator. What is checked: exit 0 and 1 power the VM off, exit 75 after a preemption
does not (and logs how to restart), a pause that was not a preemption still powers off, a
SIGTERM reaches the job, the install is pinned and happens once, a missing GPU or a failed
install powers off instead of idling, and values are quoted so a URL reaches the job intact.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import colabjob
from colabjob.errors import ConfigError
from colabjob.runner.handoff.startup_script import TORCH_CPU_INDEX, render_startup_script
from colabjob.runner.record import create_record
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.runner.fake_metadata import fake_metadata
from tests.runner.vm_stubs import FakeVm, stub_env_lines

VERSION = colabjob.__version__
JOB = "gs://bucket/jobs/run1"
SHELLCHECK_HINT = "shellcheck is missing: apt-get install -y shellcheck (Debian/Ubuntu)"


def render(**kw: Any) -> str:
    args: dict[str, Any] = {
        "job_url": JOB,
        "version": VERSION,
        "gpu": False,
        "instance": "colabjob-run1",
        "zone": "us-central1-a",
        "project": "my-project",
    }
    args.update(kw)
    return render_startup_script(**args)


# -- static checks ------------------------------------------------------------------------
VARIANTS = {
    "cpu": {},
    "gpu-extras": {"gpu": True, "extra_packages": ["my-train>=1.2", "x @ https://e.com/x.whl"]},
    "resume-args": {"resume_args": ["--max-restarts", "3"], "job_url": "gs://b/it's $(x)"},
    "mig": {"gpu": True, "mig": "colabjob-run1"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_script_is_valid_bash_and_passes_shellcheck(variant: str, tmp_path: Path) -> None:
    path = tmp_path / "startup.sh"
    path.write_text(render(**VARIANTS[variant]))
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail(SHELLCHECK_HINT)
    lint = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=style", str(path)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_script_pins_this_version_and_holds_no_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/secret/key-file.json")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    script = render(gpu=True)
    assert f"COLABJOB_VERSION={VERSION}" in script
    assert 'pip_install "colabjob==$COLABJOB_VERSION"' in script
    assert "--platform gce" in script and "EXPECT_GPU=1" in script
    for secret in ("/secret/key-file.json", "hf_secret_token_value", "GOOGLE_APPLICATION"):
        assert secret not in script


def test_credentials_and_non_gcs_urls_are_refused() -> None:
    with pytest.raises(ConfigError, match="credential"):
        render(extra_packages=["git+https://user:ghp_token@github.com/me/train.git"])
    with pytest.raises(ConfigError, match="not a gs:// URL"):
        render(job_url="/content/drive/MyDrive/jobs/run1")
    with pytest.raises(ConfigError, match="cannot go into"):
        render(instance="a\nrm -rf /")


# -- running it ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rc", "preempted", "powers_off", "says"),
    [
        (0, False, True, "job completed"),
        (1, False, True, "job failed (exit 1)"),
        (2, False, True, "job failed (exit 2)"),
        (75, True, False, "this spot VM was preempted"),
        (75, False, True, "stop request or time budget"),
    ],
)
def test_what_the_vm_does_after_the_job_exits(
    rc: int, preempted: bool, powers_off: bool, says: str, tmp_path: Path
) -> None:
    vm = FakeVm(tmp_path, installed=VERSION)
    with fake_metadata(preemptible=True) as meta:
        if preempted:
            meta.preempt()
        done = vm.run(render(), STUB_RC=str(rc), GCE_METADATA_HOST=meta.host)
    assert done.returncode == 0, done.stdout + done.stderr
    assert vm.stub_log("colabjob").splitlines() == [f"resume {JOB} --platform gce"]
    assert says in vm.log
    assert vm.shutdowns == (["-h now"] if powers_off else [])
    assert vm.gcloud_calls == []  # not in a managed instance group: no gcloud at all
    if rc != 0:
        assert "gcloud compute instances start colabjob-run1 --zone us-central1-a" in vm.log
    # the log reaches stdout (the serial console), the job's own output included
    assert says in done.stdout and "colabjob stub: training output line" in done.stdout
    env = stub_env_lines(vm)
    assert env["GCE_METADATA_HOST"] == meta.host and env["PYTHONUNBUFFERED"] == "1"


RESIZE_0 = (
    "[compute][instance-groups][managed][resize][colabjob-run1][--size=0]"
    "[--zone][us-central1-a][--project][my-project]"
)


@pytest.mark.parametrize(
    ("rc", "preempted", "leaves", "says"),
    [
        (0, False, True, "job completed"),
        (1, False, True, "job failed (exit 1)"),
        (75, True, False, "the managed instance group colabjob-run1 recreates it"),
        (75, False, True, "stop request or time budget"),
    ],
)
def test_in_a_managed_instance_group_the_vm_resizes_it_to_zero_instead_of_powering_off(
    rc: int, preempted: bool, leaves: bool, says: str, tmp_path: Path
) -> None:
    vm = FakeVm(tmp_path, installed=VERSION)
    script = render(mig="colabjob-run1")
    with fake_metadata(preemptible=True) as meta:
        if preempted:
            meta.preempt()
        done = vm.run(script, STUB_RC=str(rc), GCE_METADATA_HOST=meta.host)
    assert done.returncode == 0, done.stdout + done.stderr
    assert says in vm.log
    assert vm.shutdowns == []  # a powered-off VM would be recreated by the group
    assert vm.gcloud_calls == ([RESIZE_0] if leaves else [])
    if rc != 0 and not preempted:
        assert "instance-groups managed resize colabjob-run1 --size=1" in vm.log
        assert "instance-templates delete colabjob-run1-tmpl" in vm.log
    assert "compute instances start" not in vm.log  # that would not be the group's VM


def test_a_failing_resize_is_retried_then_the_vm_powers_off_with_the_command(
    tmp_path: Path,
) -> None:
    vm = FakeVm(tmp_path, installed=VERSION)
    done = vm.run(render(mig="colabjob-run1"), STUB_RC="0", STUB_GCLOUD_RC="1")
    assert done.returncode == 0
    assert vm.gcloud_calls == [RESIZE_0] * 3 and "attempt 3 of 3" in vm.log
    assert "ERROR: could not resize colabjob-run1 to 0" in vm.log
    assert "roles/compute.instanceAdmin.v1" in vm.log
    assert vm.shutdowns == ["-h now"]


def test_a_bad_group_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot go into"):
        render(mig="a\nshutdown")


def test_a_sigterm_reaches_the_job_and_a_preempted_vm_is_left_to_gce(tmp_path: Path) -> None:
    vm = FakeVm(tmp_path, installed=VERSION)
    with fake_metadata(preemptible=True) as meta:
        proc = vm.popen(render(), STUB_WAIT_TERM="1", GCE_METADATA_HOST=meta.host)
        try:
            _wait_for(Path(f"{vm.logs}.ready"), proc)
            meta.preempt()  # GCE: the notice, then the ACPI soft-off sends SIGTERM
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, out
    assert "got-term" in vm.stub_log("colabjob")
    assert "asking the job to commit a checkpoint" in vm.log
    assert "this spot VM was preempted" in vm.log, vm.log + vm.stub_log("colabjob")
    assert "gcloud compute instances start" in vm.log
    assert vm.shutdowns == []


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    """Until the stub says it runs (an event, not a deadline; bounded in case it never does)."""
    for _ in range(2000):
        if path.exists():
            return
        if proc.poll() is not None:
            pytest.fail(f"script ended early: {proc.communicate()[0]}")
        time.sleep(0.01)
    pytest.fail("the colabjob stub never started")


@pytest.mark.parametrize("gpu", [False, True])
def test_first_boot_installs_the_pinned_version_once(gpu: bool, tmp_path: Path) -> None:
    vm = FakeVm(tmp_path)  # no venv yet
    script = render(gpu=gpu, extra_packages=["my-train==2.0"])
    first = vm.run(script)
    assert first.returncode == 0, first.stdout
    pip = vm.stub_log("pip").splitlines()
    assert pip[-1].endswith(f"install --quiet --disable-pip-version-check colabjob=={VERSION} "
                            "my-train==2.0")
    cpu_torch = [line for line in pip if f"torch --index-url {TORCH_CPU_INDEX}" in line]
    assert len(cpu_torch) == (0 if gpu else 1)
    assert vm.stub_log("colabjob").count("resume") == 1
    # second boot (after a preemption and `gcloud compute instances start`): no reinstall
    second = vm.run(script)
    assert second.returncode == 0
    assert vm.stub_log("pip").splitlines() == pip
    assert vm.stub_log("colabjob").count("resume") == 2
    assert f"colabjob {VERSION} is installed" in vm.log


def test_an_outdated_install_is_replaced_by_the_pinned_version(tmp_path: Path) -> None:
    vm = FakeVm(tmp_path, installed="0.0.1")
    assert vm.run(render()).returncode == 0
    assert f"colabjob=={VERSION}" in vm.stub_log("pip")


def test_a_failed_install_powers_off_instead_of_idling(tmp_path: Path) -> None:
    vm = FakeVm(tmp_path)
    done = vm.run(render(gpu=True), STUB_PIP_RC="1")
    assert done.returncode == 0
    assert "could not install colabjob" in vm.log and "attempt 3 of 3" in vm.log
    assert vm.stub_log("colabjob") == ""
    assert vm.shutdowns == ["-h now"]


def test_no_gpu_on_a_gpu_vm_powers_off_instead_of_training_on_cpu(tmp_path: Path) -> None:
    vm = FakeVm(tmp_path, installed=VERSION)
    done = vm.run(render(gpu=True), STUB_GPU_RC="9")
    assert done.returncode == 0
    assert "no GPU visible" in vm.log
    assert vm.stub_log("colabjob") == ""
    assert vm.shutdowns == ["-h now"]


def test_values_reach_the_job_exactly_as_given(tmp_path: Path) -> None:
    vm = FakeVm(tmp_path, installed=VERSION)
    url = "gs://b/it's $(touch pwned) `x` ; rm"
    done = vm.run(render(job_url=url, resume_args=["--note", "a b"]))
    assert done.returncode == 0
    assert vm.stub_log("argv").splitlines() == [
        f"[resume][{url}][--platform][gce][--note][a b]"
    ]
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


# -- against the GCS emulator and the fake metadata server ---------------------------------
@pytest.mark.gcs
def test_the_resume_step_sees_the_job_on_gcs_and_the_gce_profile(
    gcs_bucket: str, tmp_path: Path
) -> None:
    store = open_store(gcs_bucket)
    create_record(store, job_id="run1", config={"job": {"name": "run1", "kind": "scratch"}})
    ckpts = CheckpointStore(store)
    for step in (10, 20):
        ckpts.save(step, {"model.bin": bytes([step]) * 4096})
    vm = FakeVm(tmp_path, colabjob="python", installed=VERSION)
    with fake_metadata(preemptible=True) as meta:
        done = vm.run(render(job_url=gcs_bucket), GCE_METADATA_HOST=meta.host)
    assert done.returncode == 0, done.stdout + vm.log
    seen = json.loads(Path(f"{vm.logs}.probe").read_text())
    assert seen == {
        "command": "resume",
        "url": gcs_bucket,
        "job_id": "run1",
        "moved_from": None,
        "latest_step": 20,
        "platform": "gce",
        "preemptible": True,
    }
    assert "would resume at step 20" in vm.log
    assert vm.shutdowns == ["-h now"]
