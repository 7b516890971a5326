"""Hand a paused job off to a GCP VM (``colabjob handoff``).

Cheap checks come first, before anything is copied or billed: the VM's formats
(``gcloud.VmSpec``), gcloud and its login, the job (it exists, was not moved, is not
finished, and no live runner holds its lease: "job not paused"), the destination bucket.
A job that does not live on GCS (Drive, a local path) is then copied to ``--to gs://...``
under its lease, every file verified against its manifest (``transfer.copy_job``), and the
old location is marked as moved so it refuses to run and points at the new one. Last, the
startup script is rendered (``startup_script``) and ``gcloud compute instances create`` runs,
or, with ``dry_run``, the exact command is only returned (nothing is copied or created).
With ``restart_on_preemption`` the two commands are ``gcloud compute instance-templates
create`` and ``gcloud compute instance-groups managed create --size=1``: the group recreates
a preempted VM, and the startup script resizes it to 0 instead of powering off.
Credentials never enter the script, the record or the command: the VM reaches GCS through
its service account (``--scopes=cloud-platform``). The checks on the job and its destination,
the verified move and the plan file are ``prepare``'s (shared with SkyPilot and Kaggle).
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import colabjob
from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import HandoffError
from colabjob.runner.handoff.gcloud import (
    DEFAULT_DISK_GB,
    DEFAULT_IMAGE_FAMILY,
    DEFAULT_IMAGE_PROJECT,
    Accelerator,
    Runner,
    VmSpec,
    check_gcloud,
    create_argv,
    describe_failure,
    group_argv,
    instance_name_for,
    parse_accelerator,
    run_gcloud,
    template_argv,
)
from colabjob.runner.handoff.prepare import check_to, move_job, prepare_job, write_plan_file
from colabjob.runner.handoff.startup_script import render_startup_script
from colabjob.runner.handoff.transfer import TransferReport

__all__ = ["HandoffPlan", "handoff"]


@dataclass(frozen=True, kw_only=True)
class HandoffPlan:
    """What a handoff did (or, with ``dry_run``, would do)."""

    job_url: str  # where the job was
    run_url: str  # the gs:// URL the VM resumes
    vm: VmSpec
    script_path: Path
    argv: tuple[str, ...]  # instances create, or (restart_on_preemption) the template's
    group_argv: tuple[str, ...] = ()  # instance-groups managed create (restart_on_preemption)
    account: str | None = None  # the gcloud account (None on a dry run)
    transfer: TransferReport | None = None
    copy_needed: bool = False
    dry_run: bool = False
    created: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def commands(self) -> tuple[tuple[str, ...], ...]:
        return (self.argv, self.group_argv) if self.group_argv else (self.argv,)

    @property
    def command(self) -> str:
        """The exact gcloud command(s), shell-quoted, one a line."""
        return "\n".join(shlex.join(argv) for argv in self.commands)

    def next_steps(self) -> list[str]:
        where = f"--zone {self.vm.zone} --project {self.vm.project}"
        if self.dry_run:
            steps = ["dry run: nothing was copied, marked or created"]
            if self.copy_needed:
                steps.append(
                    f"without --dry-run the job is first copied to {self.run_url} (verified)"
                )
            return [*steps, f"startup script: {self.script_path}", f"command: {self.command}"]
        if self.group_argv:
            return self._group_steps(where)
        return [
            f"VM {self.vm.name} created; it installs colabjob {colabjob.__version__} and "
            f"resumes {self.run_url}",
            f"follow it: gcloud compute instances get-serial-port-output {self.vm.name} {where}",
            f"job status: colabjob status {self.run_url}",
            "it powers off when the job completes, fails or pauses; after a spot preemption "
            f"restart it with: gcloud compute instances start {self.vm.name} {where}",
            f"a stopped VM still bills its disk: gcloud compute instances delete {self.vm.name} "
            f"{where}",
        ]

    def _group_steps(self, where: str) -> list[str]:
        group = f"gcloud compute instance-groups managed {{}} {self.vm.name} {where}"
        return [
            f"managed instance group {self.vm.name} created (size 1, template "
            f"{self.vm.template}); its VM installs colabjob {colabjob.__version__} and resumes "
            f"{self.run_url}, and is recreated after each spot preemption",
            f"its VM: {group.format('list-instances')} (then get-serial-port-output VM {where})",
            f"job status: colabjob status {self.run_url}",
            "when the job completes, fails or pauses the VM resizes the group to 0 (deleting "
            f"itself); to run it again: {group.format('resize')} --size=1",
            f"when done, delete the group and its template: {group.format('delete')}; gcloud "
            f"compute instance-templates delete {self.vm.template} --project {self.vm.project}",
        ]


def handoff(
    job_url: str,
    *,
    project: str,
    zone: str,
    machine_type: str,
    accelerator: str | Accelerator | None = None,
    spot: bool = False,
    restart_on_preemption: bool = False,
    to: str | None = None,
    dry_run: bool = False,
    image_family: str = DEFAULT_IMAGE_FAMILY,
    image_project: str = DEFAULT_IMAGE_PROJECT,
    disk_gb: int = DEFAULT_DISK_GB,
    name: str | None = None,
    service_account: str | None = None,
    extra_packages: Sequence[str] = (),
    script_path: str | Path | None = None,
    notify_secret: str | None = None,
    gcloud: str = "gcloud",
    runner: Runner = subprocess.run,
    clock: Clock = SYSTEM_CLOCK,
    log: Callable[[str], None] | None = None,
) -> HandoffPlan:
    """Move the job at ``job_url`` to a new GCE VM (see the module docstring).

    ``to`` (a ``gs://`` URL) is required when the job is not on GCS, and optional otherwise
    (a copy to another bucket, e.g. one in the VM's region). ``runner`` runs gcloud
    (``subprocess.run``'s signature); ``log`` receives progress lines. ``notify_secret``:
    the Secret Manager secret the VM reads ``COLABJOB_NOTIFY`` from (notification URLs hold
    tokens and never go into the startup script).
    """
    say = log or (lambda _msg: None)
    acc = parse_accelerator(accelerator) if isinstance(accelerator, str) else accelerator
    vm = VmSpec(
        name=name or "colabjob-job",  # the job's own name once its record is read
        project=project,
        zone=zone,
        machine_type=machine_type,
        accelerator=acc,
        spot=spot,
        restart_on_preemption=restart_on_preemption,
        image_family=image_family,
        image_project=image_project,
        disk_gb=disk_gb,
        service_account=service_account,
    )
    check_to(to)
    account = None if dry_run else check_gcloud(gcloud=gcloud, runner=runner)

    job = prepare_job(job_url, to=to, clock=clock, extra_packages=extra_packages)
    src, dst, record, copy_needed = job.src, job.dst, job.record, job.copy_needed
    if name is None:
        vm = dataclasses.replace(vm, name=instance_name_for(record.job_id))
    warnings = [*job.warnings, *_location_warnings(dst.url, vm)]
    if record.extras.get("notify") and notify_secret is None:
        shown = ", ".join(map(str, record.extras["notify"]))
        warnings.append(
            f"this job notified {shown}; notification URLs hold tokens and do not travel "
            "with the job: put them in a Secret Manager secret (gcloud secrets create NAME "
            "--data-file=-) and hand off with --notify-secret NAME (the VM's service account "
            "needs roles/secretmanager.secretAccessor)"
        )
    script = render_startup_script(  # before anything moves: a bad value stops us here
        job_url=dst.url,
        version=colabjob.__version__,
        gpu=vm.has_gpu,
        instance=vm.name,
        zone=vm.zone,
        project=vm.project,
        extra_packages=extra_packages,
        mig=vm.name if restart_on_preemption else None,
        notify_secret=notify_secret,
    )
    path = write_plan_file(script, script_path, f"{vm.name}-startup.sh")
    plan = HandoffPlan(
        job_url=src.url,
        run_url=dst.url,
        vm=vm,
        script_path=path,
        argv=tuple(make_argv(vm, path, job_id=record.job_id, gcloud=gcloud)),
        group_argv=tuple(group_argv(vm, gcloud=gcloud)) if restart_on_preemption else (),
        account=account,
        copy_needed=copy_needed,
        dry_run=dry_run,
        warnings=tuple(warnings),
    )
    if dry_run:
        return plan
    if copy_needed:
        plan = dataclasses.replace(plan, transfer=move_job(src, dst, clock=clock, say=say))
    _create_vm(plan, runner=runner, say=say)
    return dataclasses.replace(plan, created=True)


def _create_vm(plan: HandoffPlan, *, runner: Runner, say: Callable[[str], None]) -> None:
    vm = plan.vm
    made = [("instance template", vm.template), ("managed instance group", vm.name)]
    for i, argv in enumerate(plan.commands):
        what, name = made[i] if plan.group_argv else ("VM", vm.name)
        say(f"creating {what} {name}: {shlex.join(argv)}")
        done = run_gcloud(argv, runner=runner)
        if done.returncode != 0:
            raise HandoffError(
                f"gcloud could not create {what} {name} (exit {done.returncode}):\n"
                f"{describe_failure(done)}",
                hint=_create_hint(plan, made_template=i > 0),
            )


def _create_hint(plan: HandoffPlan, *, made_template: bool) -> str:
    moved = f"the job now lives at {plan.run_url}; " if plan.copy_needed else ""
    if made_template:
        moved += (
            f"the template {plan.vm.template} exists: delete it before trying again "
            f"(gcloud compute instance-templates delete {plan.vm.template} --project "
            f"{plan.vm.project}); "
        )
    return (
        f"{moved}nothing runs yet. GPUs are often sold out in a zone "
        "(ZONE_RESOURCE_POOL_EXHAUSTED) or over quota (`gcloud compute regions describe "
        f"{plan.vm.region}`): try another zone with "
        f"`colabjob handoff {plan.run_url} --zone ...`"
    )


def make_argv(vm: VmSpec, path: Path, *, job_id: str, gcloud: str) -> list[str]:
    """``instances create``, or the group's template (``restart_on_preemption``)."""
    make = template_argv if vm.restart_on_preemption else create_argv
    return make(vm, path, job_id=job_id, gcloud=gcloud)


# -- the destination's region -------------------------------------------------------------
def bucket_location(url: str, *, project: str | None = None) -> str | None:
    """The bucket's location (``US-CENTRAL1``, ``US``...), or None if we may not read it."""
    try:
        from google.cloud import storage

        from colabjob.storage.gcs import emulator_host

        if emulator_host():
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project="test", credentials=AnonymousCredentials())
        else:
            client = storage.Client(project=project)
        bucket = client.get_bucket(url.split("://", 1)[1].split("/", 1)[0], timeout=20)
        return str(bucket.location) if bucket.location else None
    except Exception:  # best effort: storage.buckets.get is not always granted
        return None


def _location_warnings(url: str, vm: VmSpec) -> Iterator[str]:
    location = bucket_location(url, project=vm.project)
    if location and "-" in location and location.lower() != vm.region:
        yield (
            f"the bucket of {url} is in {location.lower()} but the VM in {vm.region}: every "
            "checkpoint crosses regions (billed per GB, and slower); a bucket in "
            f"{vm.region} avoids that"
        )
