"""``colabjob handoff``: validation, the gcloud command, and the whole move with a stub gcloud.

gcloud is exercised through the real subprocess path: a stub ``gcloud`` executable on PATH
(records its argv and the startup script it was given, prints a chosen account, fails when
told to). Where the real Google Cloud CLI is installed, it parses our exact argv too (with no
credentials it stops at "no active account", after every flag and value was accepted).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

import colabjob
from colabjob.cli.handoff import cmd_handoff, configure_parser
from colabjob.errors import (
    BucketNotFoundError,
    ConfigError,
    GcloudError,
    HandoffError,
    JobMovedError,
    JobNotPausedError,
    JobStateError,
)
from colabjob.runner.handoff.gcloud import (
    Accelerator,
    VmSpec,
    create_argv,
    group_argv,
    instance_name_for,
    parse_accelerator,
    template_argv,
    template_name_for,
)
from colabjob.runner.handoff.to_vm import handoff
from colabjob.runner.handoff.transfer import MOVED_KEY, check_not_moved, read_moved
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import LEASE_KEY, Holder, read_lease
from colabjob.runner.record import create_record, load_record, update_record
from colabjob.runner.states import JobEvent
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import Store, open_store
from tests.fakes import FakeClock
from tests.runner.vm_stubs import write_exe
from tests.storage.ckpt_helpers import files_for

VM = {"project": "my-project", "zone": "us-central1-a", "machine_type": "g2-standard-8"}

GCLOUD_STUB = """#!/bin/bash
for arg in "$@"; do printf '[%s]' "$arg"; done >> "$GCLOUD_LOG"
echo >> "$GCLOUD_LOG"
if [ "$1 $2" = "auth list" ]; then
  [ -z "${GCLOUD_ACCOUNT:-}" ] || echo "$GCLOUD_ACCOUNT"
  exit 0
fi
if [ "$1 $2 $3" = "compute instances create" ] || [ "$2 $3" = "instance-templates create" ]; then
  for arg in "$@"; do
    case "$arg" in --metadata-from-file=startup-script=*)
      cp "${arg#--metadata-from-file=startup-script=}" "$GCLOUD_LOG.script";;
    esac
  done
  [ -z "${GCLOUD_CREATE_ERR:-}" ] || { echo "$GCLOUD_CREATE_ERR" >&2; exit 1; }
  echo "Created [https://www.googleapis.com/compute/v1/projects/p/zones/z/instances/$4]."
fi
if [ "$2 $3 $4" = "instance-groups managed create" ] && [ -n "${GCLOUD_GROUP_ERR:-}" ]; then
  echo "$GCLOUD_GROUP_ERR" >&2
  exit 1
fi
"""


class Gcloud:
    """The stub on PATH and what it recorded."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin = root / "gcloud-bin"
        self.log = root / "gcloud.log"
        write_exe(self.bin / "gcloud", GCLOUD_STUB)
        monkeypatch.setenv("PATH", f"{self.bin}:{os.environ['PATH']}")
        monkeypatch.setenv("GCLOUD_LOG", str(self.log))
        monkeypatch.setenv("GCLOUD_ACCOUNT", "me@example.com")
        monkeypatch.delenv("GCLOUD_CREATE_ERR", raising=False)
        monkeypatch.delenv("GCLOUD_GROUP_ERR", raising=False)

    @property
    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    @property
    def script(self) -> str:
        return Path(f"{self.log}.script").read_text()


@pytest.fixture
def gcloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Gcloud:
    return Gcloud(tmp_path, monkeypatch)


@pytest.fixture
def drive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "drive"
    (root / "MyDrive").mkdir(parents=True)
    monkeypatch.setenv("COLABJOB_DRIVE_ROOT", str(root))
    return root / "MyDrive"


def make_job(store: Store, *, config: dict[str, Any] | None = None) -> None:
    create_record(
        store, job_id="Run_1", config=config or {"job": {"name": "Run_1", "kind": "scratch"}}
    )
    lease = Lease(store, holder=Holder(host="colab", platform="colab", pid=1, session_id="s1"))
    lease.acquire()
    ckpts = CheckpointStore(store, fence=lease.current_epoch)
    for step in (10, 20):
        ckpts.save(step, files_for(step), epoch=lease.epoch)
    lease.release()


def no_runner(*args: Any, **kw: Any) -> subprocess.CompletedProcess[str]:
    raise AssertionError(f"gcloud must not run: {args}")


# -- formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("zone", ["us-central1-a", "europe-west4-b", "northamerica-northeast1-c"])
@pytest.mark.parametrize(
    "machine", ["g2-standard-8", "n1-standard-8", "a2-highgpu-1g", "custom-8-30720", "e2-medium",
                "n2-custom-8-30720", "c3-standard-22-lssd", "a3-highgpu-8g"],
)
def test_valid_zones_and_machine_types_pass(zone: str, machine: str) -> None:
    vm = VmSpec(name="colabjob-x", project="my-project", zone=zone, machine_type=machine)
    assert vm.region == zone.rsplit("-", 1)[0]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("zone", "us-central1", "not a valid zone"),
        ("zone", "US-CENTRAL1-A", "not a valid zone"),
        ("zone", "uscentral1a", "not a valid zone"),
        ("machine_type", "g2standard8", "not a valid machine type"),
        ("machine_type", "G2-standard-8", "not a valid machine type"),
        ("machine_type", "standard-8", "not a valid machine type"),
        ("machine_type", "us-central1-a", "not a valid machine type"),
        ("project", "My Project", "not a valid project id"),
        ("name", "Colab_Job", "not a valid instance name"),
        ("disk_gb", 10, "too small"),
    ],
)
def test_bad_formats_are_refused_with_a_hint(field: str, value: Any, says: str) -> None:
    args: dict[str, Any] = {"name": "colabjob-x", **VM, field: value}
    with pytest.raises(ConfigError, match=says) as info:
        VmSpec(**args)
    assert info.value.hint and info.value.exit_code == 2


def test_accelerators_parse_and_validate() -> None:
    assert parse_accelerator("type=nvidia-l4,count=1") == Accelerator(type="nvidia-l4")
    assert parse_accelerator("count=2, type=nvidia-tesla-t4") == Accelerator(
        type="nvidia-tesla-t4", count=2
    )
    assert parse_accelerator("nvidia-a100-80gb").count == 1
    with pytest.raises(ConfigError, match="unknown accelerator") as info:
        parse_accelerator("type=l4,count=1")
    assert info.value.hint == "did you mean nvidia-l4?"
    for bad in ("type=nvidia-l4,count=3", "type=nvidia-l4,count=x", "kind=nvidia-l4", "count=1"):
        with pytest.raises(ConfigError):
            parse_accelerator(bad)
    with pytest.raises(ConfigError, match="attach only to g2") as info:
        VmSpec(name="x", project="my-project", zone="us-central1-a",
               machine_type="n1-standard-8", accelerator=Accelerator(type="nvidia-l4"))
    assert "g2-standard-8" in str(info.value.hint)


def test_instance_names_come_from_the_job_id() -> None:
    assert instance_name_for("Run_1") == "colabjob-run-1"
    assert instance_name_for("x" * 100) == "colabjob-" + "x" * 54
    assert instance_name_for("___") == "colabjob-job"


# -- the gcloud command -----------------------------------------------------------------------
def spot_l4_vm() -> VmSpec:
    return VmSpec(
        name="colabjob-run-1",
        project="my-project",
        zone="us-central1-a",
        machine_type="g2-standard-8",
        accelerator=Accelerator(type="nvidia-l4", count=1),
        spot=True,
    )


def test_the_spot_gpu_command() -> None:
    argv = create_argv(spot_l4_vm(), "/tmp/s.sh", job_id="Run_1")
    assert argv == [
        "gcloud", "compute", "instances", "create", "colabjob-run-1",
        "--project=my-project",
        "--zone=us-central1-a",
        "--machine-type=g2-standard-8",
        "--accelerator=type=nvidia-l4,count=1",
        "--maintenance-policy=TERMINATE",
        "--provisioning-model=SPOT",
        "--instance-termination-action=STOP",
        "--image-family=common-cu124-debian-11-py310",
        "--image-project=deeplearning-platform-release",
        "--boot-disk-size=100GB",
        "--boot-disk-type=pd-balanced",
        "--scopes=cloud-platform",
        "--metadata-from-file=startup-script=/tmp/s.sh",
        "--metadata=install-nvidia-driver=True",
        "--labels=colabjob=job,colabjob-job=run_1",
    ]  # fmt: skip


def test_a_cpu_vm_has_no_gpu_flags() -> None:
    sa = "sa@my-project.iam.gserviceaccount.com"
    vm = VmSpec(name="colabjob-x", **{**VM, "machine_type": "n2-standard-8"}, service_account=sa)
    argv = create_argv(vm, "/tmp/s.sh")
    joined = " ".join(argv)
    for flag in ("--accelerator", "--maintenance-policy", "SPOT", "install-nvidia-driver"):
        assert flag not in joined
    assert f"--service-account={sa}" in argv
    assert "--scopes=cloud-platform" in argv


def test_the_managed_group_commands() -> None:
    vm = dataclasses.replace(spot_l4_vm(), restart_on_preemption=True)
    assert vm.template == "colabjob-run-1-tmpl"
    assert template_argv(vm, "/tmp/s.sh", job_id="Run_1") == [
        "gcloud", "compute", "instance-templates", "create", "colabjob-run-1-tmpl",
        "--project=my-project",  # no --zone: a global template
        "--machine-type=g2-standard-8",
        "--accelerator=type=nvidia-l4,count=1",
        "--maintenance-policy=TERMINATE",
        "--provisioning-model=SPOT",
        "--instance-termination-action=DELETE",  # the group recreates it; no disk left behind
        "--image-family=common-cu124-debian-11-py310",
        "--image-project=deeplearning-platform-release",
        "--boot-disk-size=100GB",
        "--boot-disk-type=pd-balanced",
        "--scopes=cloud-platform",
        "--metadata-from-file=startup-script=/tmp/s.sh",
        "--metadata=install-nvidia-driver=True",
        "--labels=colabjob=job,colabjob-job=run_1",
    ]  # fmt: skip
    assert group_argv(vm) == [
        "gcloud", "compute", "instance-groups", "managed", "create", "colabjob-run-1",
        "--project=my-project", "--zone=us-central1-a", "--template=colabjob-run-1-tmpl",
        "--size=1",
    ]  # fmt: skip
    assert template_name_for("x" * 63) == "x" * 58 + "-tmpl"
    assert template_name_for("a" * 57 + "-bcd") == "a" * 57 + "-tmpl"


def test_restart_on_preemption_needs_spot() -> None:
    with pytest.raises(ConfigError, match="needs --spot") as info:
        VmSpec(name="colabjob-x", **VM, restart_on_preemption=True)
    assert info.value.exit_code == 2 and "--spot" in str(info.value.hint)


def real_gcloud_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),  # no credentials at all
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }


def assert_parsed_then_refused(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode != 0  # it must stop: nobody is logged in
    assert "active account" in done.stderr, done.stderr  # ...only there: every flag parsed
    for parse_error in ("unrecognized arguments", "Invalid choice", "Invalid value", "argument "):
        assert parse_error not in done.stderr


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Google Cloud CLI is not installed")
@pytest.mark.parametrize("which", ["template", "group", "resize"])
def test_the_real_gcloud_accepts_the_managed_group_commands(which: str, tmp_path: Path) -> None:
    vm = dataclasses.replace(spot_l4_vm(), restart_on_preemption=True)
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/bash\n")
    argv = {
        "template": template_argv(vm, script, job_id="Run_1"),
        "group": group_argv(vm),
        # what the startup script runs when the job is done
        "resize": ["gcloud", "compute", "instance-groups", "managed", "resize", vm.name,
                   "--size=0", "--zone", vm.zone, "--project", vm.project],
    }[which]
    done = subprocess.run(argv, env=real_gcloud_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert_parsed_then_refused(done)


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Google Cloud CLI is not installed")
@pytest.mark.parametrize("spot", [True, False])
def test_the_real_gcloud_accepts_our_command(spot: bool, tmp_path: Path) -> None:
    vm = spot_l4_vm() if spot else VmSpec(name="colabjob-x", **VM)
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/bash\n")
    done = subprocess.run(
        create_argv(vm, script, job_id="Run_1"), env=real_gcloud_env(tmp_path),
        capture_output=True, text=True, timeout=120,
    )
    assert_parsed_then_refused(done)


# -- gcloud checks (a stub on PATH) ---------------------------------------------------------
def test_gcloud_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GcloudError, match="not installed") as info:
        handoff("gs://bucket/job", **VM)
    assert "--dry-run" in str(info.value.hint) and info.value.exit_code == 2


def test_gcloud_not_authenticated(gcloud: Gcloud, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCLOUD_ACCOUNT", "")
    with pytest.raises(GcloudError, match="not authenticated") as info:
        handoff("gs://bucket/job", **VM)
    assert "gcloud auth login" in str(info.value.hint)
    assert gcloud.calls == ["[auth][list][--filter=status:ACTIVE][--format=value(account)]"]


# -- the whole handoff ----------------------------------------------------------------------
@pytest.mark.gcs
def test_dry_run_of_a_gcs_job_prints_the_command_and_changes_nothing(
    gcs_bucket: str, tmp_path: Path
) -> None:
    store = open_store(gcs_bucket)
    make_job(store)
    before = store.list()
    plan = handoff(gcs_bucket, **VM, accelerator="type=nvidia-l4,count=1", spot=True,
                   dry_run=True, script_path=tmp_path / "s.sh", runner=no_runner)
    assert plan.dry_run and not plan.created and not plan.copy_needed
    assert plan.run_url == gcs_bucket and plan.vm.name == "colabjob-run-1"
    assert plan.argv == tuple(create_argv(plan.vm, tmp_path / "s.sh", job_id="Run_1"))
    assert f"--metadata-from-file=startup-script={tmp_path / 's.sh'}" in plan.command
    script = (tmp_path / "s.sh").read_text()
    assert f"JOB_URL={gcs_bucket}" in script
    assert f"COLABJOB_VERSION={colabjob.__version__}" in script
    assert "EXPECT_GPU=1" in script
    assert store.list() == before  # nothing written, no lease taken


@pytest.mark.gcs
def test_a_drive_job_is_copied_marked_and_handed_to_gcloud(
    drive: Path, gcs_bucket: str, gcloud: Gcloud
) -> None:
    src = open_store(str(drive / "jobs" / "run1"))
    make_job(src)
    plan = handoff(str(drive / "jobs" / "run1"), **VM, spot=True, to=gcs_bucket)
    assert plan.created and plan.account == "me@example.com" and plan.copy_needed
    assert plan.transfer is not None and plan.transfer.copied == (10, 20)
    # the old location refuses to run and points at the new one
    with pytest.raises(JobMovedError, match=gcs_bucket):
        check_not_moved(src)
    marker = read_moved(src)
    assert marker is not None and marker.last_step == 20
    assert load_record(src).extras["moved_to"] == gcs_bucket
    lease = read_lease(src)
    assert lease is not None and lease[0].released and lease[0].holder.platform == "handoff"
    # the new one holds the job, resumable
    dst = open_store(gcs_bucket)
    assert load_record(dst).extras["moved_from"] == src.url
    latest = CheckpointStore(dst).latest(verify="full")
    assert latest is not None and latest.step == 20
    assert not dst.exists(LEASE_KEY) and not dst.exists(MOVED_KEY)
    # gcloud ran with exactly the plan's argv, and got the script that resumes from GCS
    assert gcloud.calls[-1] == "".join(f"[{a}]" for a in plan.argv[1:])
    assert f"JOB_URL={gcs_bucket}" in gcloud.script
    # handing off the old location again is refused with the pointer
    with pytest.raises(JobMovedError):
        handoff(str(drive / "jobs" / "run1"), **VM, to=gcs_bucket)


def test_a_job_off_gcs_needs_to(drive: Path) -> None:
    make_job(open_store(str(drive / "j")))
    with pytest.raises(ConfigError, match="not on GCS") as info:
        handoff(str(drive / "j"), **VM, dry_run=True)
    assert "--to gs://" in str(info.value.hint)
    with pytest.raises(ConfigError, match="not a gs:// URL"):
        handoff(str(drive / "j"), **VM, to="/tmp/elsewhere", dry_run=True)


@pytest.mark.gcs
def test_a_running_job_is_not_handed_off(drive: Path, gcs_bucket: str, gcloud: Gcloud) -> None:
    src = open_store(str(drive / "j"))
    make_job(src)
    runner = Lease(src, holder=Holder(host="colab", platform="colab", pid=2, session_id="live"))
    runner.acquire()
    for dry_run in (True, False):
        with pytest.raises(JobNotPausedError, match="job not paused") as info:
            handoff(str(drive / "j"), **VM, to=gcs_bucket, dry_run=dry_run)
        assert f"colabjob stop {src.url}" in str(info.value.hint)
    assert open_store(gcs_bucket).list() == [] and read_moved(src) is None
    assert [c for c in gcloud.calls if "create" in c] == []


@pytest.mark.gcs
def test_an_abandoned_lease_is_confirmed_expired_then_taken(
    drive: Path, gcs_bucket: str, gcloud: Gcloud
) -> None:
    src = open_store(str(drive / "j"))
    make_job(src)
    clock = FakeClock(1_700_000_000.0)
    Lease(src, holder=Holder(host="colab", platform="colab", pid=2, session_id="gone"),
          clock=clock, sync_record=False).acquire()
    clock.advance(3600)  # the Colab VM vanished an hour ago: its heartbeat stopped
    dry = handoff(str(drive / "j"), **VM, to=gcs_bucket, dry_run=True, clock=clock)
    assert any("looks abandoned" in w for w in dry.warnings)
    plan = handoff(str(drive / "j"), **VM, to=gcs_bucket, clock=clock)
    assert plan.created and sum(clock.slept) >= 120  # watched for the TTL, on the fake clock
    assert read_moved(src) is not None


@pytest.mark.gcs
def test_a_failed_vm_creation_says_what_to_do(
    drive: Path, gcs_bucket: str, gcloud: Gcloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_job(open_store(str(drive / "j")))
    monkeypatch.setenv("GCLOUD_CREATE_ERR", "ERROR: ZONE_RESOURCE_POOL_EXHAUSTED: no L4 here")
    with pytest.raises(HandoffError, match="ZONE_RESOURCE_POOL_EXHAUSTED") as info:
        handoff(str(drive / "j"), **VM, to=gcs_bucket)
    assert f"colabjob handoff {gcs_bucket} --zone" in str(info.value.hint)
    # the job moved already; handing off its new home needs no copy
    plan = handoff(gcs_bucket, **VM, dry_run=True)
    assert not plan.copy_needed and plan.run_url == gcs_bucket


@pytest.mark.gcs
def test_an_unreachable_bucket_is_reported_before_anything_moves(
    drive: Path, gcs_emulator: str, gcloud: Gcloud
) -> None:
    src = open_store(str(drive / "j"))
    make_job(src)
    missing = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/jobs/j"
    with pytest.raises(BucketNotFoundError, match="does not exist"):
        handoff(str(drive / "j"), **VM, to=missing)
    assert read_moved(src) is None


def test_a_finished_job_is_not_handed_off(drive: Path) -> None:
    src = open_store(str(drive / "j"))
    make_job(src)
    update_record(src, lambda r: r.apply(JobEvent.START).apply(JobEvent.COMPLETE))
    with pytest.raises(JobStateError, match="completed"):
        handoff(str(drive / "j"), **VM, to="gs://b/j", dry_run=True)


@pytest.mark.gcs
def test_config_that_will_not_exist_on_the_vm_is_warned_about(
    gcs_bucket: str, tmp_path: Path
) -> None:
    config = {
        "job": {"name": "Run_1", "kind": "python", "entrypoint": "train:main"},
        "data": {"source": "/content/data/train.jsonl"},
    }
    make_job(open_store(gcs_bucket), config=config)
    plan = handoff(gcs_bucket, **VM, dry_run=True, script_path=tmp_path / "s.sh")
    text = "\n".join(plan.warnings)
    assert "data.source: '/content/data/train.jsonl'" in text
    assert "'train:main' must be importable on the VM" in text


# -- the CLI face ----------------------------------------------------------------------------
def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="colabjob")
    configure_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["handoff", *argv])


@pytest.mark.gcs
def test_cli_dry_run_prints_the_exact_command(
    gcs_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_job(open_store(gcs_bucket))
    args = parse(gcs_bucket, "--project", "my-project", "--zone", "us-central1-a",
                 "--machine-type", "n1-standard-8", "--accelerator", "type=nvidia-tesla-t4,count=1",
                 "--spot", "--dry-run", "--pip", "my-train", "--script-out", str(tmp_path / "s.sh"))
    assert args.func is cmd_handoff
    assert cmd_handoff(args) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("gcloud compute instances create colabjob-run-1 ")
    assert "--accelerator=type=nvidia-tesla-t4,count=1" in first and "SPOT" in first
    assert "# dry run: nothing was copied" in out
    assert "my-train" in (tmp_path / "s.sh").read_text()


@pytest.mark.gcs
def test_cli_warnings_go_to_stderr_one_line_each(
    gcs_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"job": {"name": "Run_1"}, "data": {"source": "/content/data/train.jsonl"}}
    make_job(open_store(gcs_bucket), config=config)
    args = parse(gcs_bucket, "--project", "my-project", "--zone", "us-central1-a",
                 "--machine-type", "n1-standard-8", "--dry-run",
                 "--script-out", str(tmp_path / "s.sh"))
    assert cmd_handoff(args) == 0
    got = capsys.readouterr()
    warned = [line for line in got.err.splitlines() if line.startswith("colabjob: warning: ")]
    assert any("/content/data/train.jsonl" in line for line in warned), got.err
    assert "colabjob: warning" not in got.out


def test_cli_errors_reach_main_with_their_hint_and_exit_code() -> None:
    args = parse("gs://b/j", "--project", "my-project", "--zone", "us-central1",
                 "--machine-type", "g2-standard-8", "--dry-run")
    with pytest.raises(ConfigError, match="'us-central1' is not a valid zone") as info:
        cmd_handoff(args)
    assert info.value.exit_code == 2 and "us-central1-a" in str(info.value)


def test_cli_shares_the_common_flags() -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true")
    parser = argparse.ArgumentParser(prog="colabjob")
    configure_parser(parser.add_subparsers(dest="command"), common)
    args = parser.parse_args(["handoff", "gs://b/j", "--project", "p-1234", "--zone",
                              "us-central1-a", "--machine-type", "n1-standard-8", "--debug"])
    assert args.debug and args.spot is False and args.pip == [] and args.disk_gb == 100


@pytest.mark.gcs
@pytest.mark.parametrize(("zone", "warned"), [("europe-west4-a", True), ("us-central1-b", False)])
def test_a_bucket_in_another_region_is_warned_about(
    gcs_bucket: str, tmp_path: Path, zone: str, warned: bool
) -> None:
    make_job(open_store(gcs_bucket))  # the emulator's buckets are in US-CENTRAL1
    plan = handoff(gcs_bucket, **{**VM, "zone": zone}, dry_run=True, script_path=tmp_path / "s")
    crossing = [w for w in plan.warnings if "crosses regions" in w]
    assert bool(crossing) == warned
    if warned:
        assert "us-central1 but the VM in europe-west4" in crossing[0]


@pytest.mark.gcs
def test_a_credential_in_pip_stops_the_handoff_before_anything_moves(
    drive: Path, gcs_bucket: str, gcloud: Gcloud
) -> None:
    src = open_store(str(drive / "j"))
    make_job(src)
    with pytest.raises(ConfigError, match="credential"):
        handoff(str(drive / "j"), **VM, to=gcs_bucket,
                extra_packages=["git+https://me:ghp_secret@github.com/me/train.git"])
    assert read_moved(src) is None and open_store(gcs_bucket).list() == []
    assert [c for c in gcloud.calls if "create" in c] == []


# -- --restart-on-preemption: a managed instance group ---------------------------------------
@pytest.mark.gcs
def test_restart_on_preemption_creates_a_template_then_a_group(
    drive: Path, gcs_bucket: str, gcloud: Gcloud, capsys: pytest.CaptureFixture[str]
) -> None:
    make_job(open_store(str(drive / "j")))
    args = parse(str(drive / "j"), "--to", gcs_bucket, "--project", "my-project", "--zone",
                 "us-central1-a", "--machine-type", "g2-standard-8", "--spot",
                 "--restart-on-preemption")
    assert cmd_handoff(args) == 0
    creates = [c for c in gcloud.calls if "[create]" in c]
    assert creates == [
        "".join(f"[{a}]" for a in template_argv(
            dataclasses.replace(spot_g2_vm(), restart_on_preemption=True),
            _script_of(creates[0]), job_id="Run_1")[1:]),
        "[compute][instance-groups][managed][create][colabjob-run-1][--project=my-project]"
        "[--zone=us-central1-a][--template=colabjob-run-1-tmpl][--size=1]",
    ]
    # the template's startup script resumes from GCS and knows its group
    assert f"JOB_URL={gcs_bucket}" in gcloud.script and "MIG=colabjob-run-1" in gcloud.script
    assert "TEMPLATE=colabjob-run-1-tmpl" in gcloud.script
    out = capsys.readouterr().out
    assert "managed instance group colabjob-run-1 created" in out
    assert "gcloud compute instance-groups managed delete colabjob-run-1 --zone" in out
    assert "gcloud compute instance-templates delete colabjob-run-1-tmpl" in out


def spot_g2_vm() -> VmSpec:
    return VmSpec(name="colabjob-run-1", **VM, spot=True)


def _script_of(call: str) -> str:
    flag = "--metadata-from-file=startup-script="
    return call.split(flag, 1)[1].split("]", 1)[0]


@pytest.mark.gcs
def test_restart_on_preemption_dry_run_prints_both_commands_and_changes_nothing(
    gcs_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(gcs_bucket)
    make_job(store)
    before = store.list()
    args = parse(gcs_bucket, "--project", "my-project", "--zone", "us-central1-a",
                 "--machine-type", "g2-standard-8", "--spot", "--restart-on-preemption",
                 "--dry-run", "--script-out", str(tmp_path / "s.sh"))
    assert cmd_handoff(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gcloud compute instance-templates create colabjob-run-1-tmpl ")
    assert "--instance-termination-action=DELETE" in lines[0] and "--zone" not in lines[0]
    assert lines[1] == (
        "gcloud compute instance-groups managed create colabjob-run-1 --project=my-project "
        "--zone=us-central1-a --template=colabjob-run-1-tmpl --size=1"
    )
    assert "# dry run: nothing was copied, marked or created" in lines
    assert "MIG=colabjob-run-1" in (tmp_path / "s.sh").read_text()
    assert store.list() == before


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--project", "my-project", "--zone", "us-central1-a", "--machine-type",
          "g2-standard-8"], "needs --spot"),
        (["--engine", "skypilot", "--gpus", "L4:1", "--spot"], "is for --engine gce"),
        (["--project", "my-project", "--zone", "us-central1-a", "--machine-type",
          "g2-standard-8", "--spot", "--name", "Bad_Name"], "not a valid instance name"),
    ],
)
def test_restart_on_preemption_bad_usage_is_refused_before_anything_runs(
    extra: list[str], says: str
) -> None:
    args = parse("gs://b/j", *extra, "--restart-on-preemption", "--dry-run")
    with pytest.raises(ConfigError, match=says) as info:
        cmd_handoff(args)
    assert info.value.exit_code == 2 and info.value.hint


@pytest.mark.gcs
def test_a_failed_group_creation_names_the_template_to_delete(
    gcs_bucket: str, gcloud: Gcloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_job(open_store(gcs_bucket))
    monkeypatch.setenv("GCLOUD_GROUP_ERR", "ERROR: QUOTA_EXCEEDED")
    with pytest.raises(HandoffError, match="managed instance group colabjob-run-1") as info:
        handoff(gcs_bucket, **VM, spot=True, restart_on_preemption=True)
    assert "QUOTA_EXCEEDED" in str(info.value)
    assert "gcloud compute instance-templates delete colabjob-run-1-tmpl" in str(info.value.hint)
