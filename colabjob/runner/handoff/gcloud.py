"""The GCE VM a job is handed off to, and the ``gcloud`` command that creates it.

``VmSpec`` validates what the user typed before anything is copied or billed: the project,
zone, machine type and accelerator *formats* (not their availability: only GCE knows which
zone has which GPU today), and the GPU/machine pairs GCE allows (L4 only on g2, A100 only on
a2, H100 only on a3, T4/V100/P100/P4 only on n1). ``create_argv`` renders the exact
``gcloud compute instances create`` argv (spot flags, accelerator, maintenance policy, the
Deep Learning VM image, a ``cloud-platform``-scoped service account: no key files), and
``check_gcloud`` finds gcloud and its active account through a real subprocess. ``run_cli``
runs any external CLI a handoff drives (gcloud, sky, kaggle) the one way: resolved on PATH, a
clear error when missing or failing.

With ``restart_on_preemption`` (spot only) the VM is instead one member of a zonal managed
instance group of size 1: ``template_argv`` renders ``gcloud compute instance-templates
create NAME-tmpl`` with the same flags (no ``--zone``: the template is global; termination
action DELETE, so a preempted VM leaves no stopped disk behind) and ``group_argv`` renders
``gcloud compute instance-groups managed create NAME --size=1``. The group recreates a VM
that was preempted, and its startup script resumes the job.
"""

from __future__ import annotations

import difflib
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colabjob.errors import ConfigError, GcloudError, HandoffError

__all__ = [
    "DEFAULT_DISK_GB",
    "DEFAULT_IMAGE_FAMILY",
    "DEFAULT_IMAGE_PROJECT",
    "KNOWN_ACCELERATORS",
    "Accelerator",
    "Runner",
    "VmSpec",
    "check_gcloud",
    "create_argv",
    "group_argv",
    "instance_name_for",
    "parse_accelerator",
    "run_cli",
    "template_argv",
    "template_name_for",
]

Runner = Callable[..., "subprocess.CompletedProcess[str]"]

DEFAULT_IMAGE_FAMILY = "common-cu124-debian-11-py310"  # Deep Learning VM: CUDA 12.4, driver
DEFAULT_IMAGE_PROJECT = "deeplearning-platform-release"
DEFAULT_DISK_GB = 100
MIN_DISK_GB = 50  # Deep Learning VM images need about this much
DEFAULT_DISK_TYPE = "pd-balanced"  # g2/a3 refuse pd-standard

_PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_FAMILY = r"[a-z][0-9][a-z0-9]?"
_MACHINE = re.compile(
    rf"{_FAMILY}-[a-z]+(?:-[0-9]+[a-z]*)?(?:-[a-z]+)?|(?:{_FAMILY}-)?custom-[0-9]+-[0-9]+(?:-ext)?"
)
_INSTANCE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_IMAGE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")

#: accelerator type -> the machine family it attaches to (None: any family that takes GPUs).
KNOWN_ACCELERATORS: dict[str, str | None] = {
    "nvidia-tesla-t4": "n1",
    "nvidia-tesla-v100": "n1",
    "nvidia-tesla-p100": "n1",
    "nvidia-tesla-p4": "n1",
    "nvidia-l4": "g2",
    "nvidia-tesla-a100": "a2",
    "nvidia-a100-80gb": "a2",
    "nvidia-h100-80gb": "a3",
    "nvidia-h100-mega-80gb": "a3",
    "nvidia-h200-141gb": "a3",
    "nvidia-b200": "a4",
    "nvidia-rtx-pro-6000": "g4",
}
#: machine families whose every type comes with GPUs attached
GPU_FAMILIES = frozenset({"a2", "a3", "a4", "g2", "g4"})
GPU_COUNTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True, kw_only=True)
class Accelerator:
    """``--accelerator=type=TYPE,count=COUNT``."""

    type: str
    count: int = 1

    def __post_init__(self) -> None:
        if not re.fullmatch(r"nvidia-[a-z0-9]+(?:-[a-z0-9]+)*", self.type):
            close = difflib.get_close_matches(
                f"nvidia-{self.type}", KNOWN_ACCELERATORS, n=1, cutoff=0.6
            )
            raise ConfigError(
                f"unknown accelerator type {self.type!r}",
                hint=f"did you mean {close[0]}?" if close else _accelerator_choices(),
            )
        if self.count not in GPU_COUNTS:
            raise ConfigError(
                f"accelerator count {self.count} is not one GCE offers",
                hint=f"one of {', '.join(map(str, GPU_COUNTS))}",
            )

    @property
    def known(self) -> bool:
        return self.type in KNOWN_ACCELERATORS

    def flag(self) -> str:
        return f"--accelerator=type={self.type},count={self.count}"


def _accelerator_choices() -> str:
    return "e.g. type=nvidia-l4,count=1; known types: " + ", ".join(KNOWN_ACCELERATORS)


def parse_accelerator(text: str) -> Accelerator:
    """``type=nvidia-l4,count=1`` (gcloud's form) or just ``nvidia-l4``."""
    s = text.strip()
    if "=" not in s:
        return Accelerator(type=s)
    fields: dict[str, str] = {}
    for part in s.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("type", "count") or key.strip() in fields:
            raise ConfigError(f"cannot read accelerator {text!r}", hint=_accelerator_choices())
        fields[key.strip()] = value.strip()
    if "type" not in fields:
        raise ConfigError(f"accelerator {text!r} has no type=", hint=_accelerator_choices())
    try:
        count = int(fields.get("count", "1"))
    except ValueError:
        raise ConfigError(f"accelerator count in {text!r} is not a number") from None
    return Accelerator(type=fields["type"], count=count)


def instance_name_for(job_id: str) -> str:
    """A valid GCE instance name for a job: ``colabjob-<job id, sanitised>``."""
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-") or "job"
    return f"colabjob-{slug}"[:63].rstrip("-")


def _label(value: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", value.lower()).strip("-")[:63] or "job"


@dataclass(frozen=True, kw_only=True)
class VmSpec:
    """What VM to create. Validated on construction (``ConfigError`` with a hint)."""

    name: str
    project: str
    zone: str
    machine_type: str
    accelerator: Accelerator | None = None
    spot: bool = False
    image_family: str = DEFAULT_IMAGE_FAMILY
    image_project: str = DEFAULT_IMAGE_PROJECT
    disk_gb: int = DEFAULT_DISK_GB
    disk_type: str = DEFAULT_DISK_TYPE
    service_account: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    restart_on_preemption: bool = False  # a managed instance group of size 1 (spot only)

    def __post_init__(self) -> None:
        _need(
            _PROJECT,
            self.project,
            "project id: GCP project ids are 6-30 characters of lowercase letters, digits "
            "and hyphens, start with a letter and do not end with a hyphen",
            "e.g. my-project-123; `gcloud projects list` shows yours",
        )
        _need(_ZONE, self.zone, "zone", "e.g. us-central1-a (`gcloud compute zones list`)")
        _need(
            _MACHINE,
            self.machine_type,
            "machine type",
            "e.g. g2-standard-8 (1 L4), n1-standard-8 (+ --accelerator), a2-highgpu-1g "
            "(1 A100), custom-8-30720 (`gcloud compute machine-types list --zones ZONE`)",
        )
        _need(_INSTANCE, self.name, "instance name", "lowercase letters, digits and '-'")
        _need(_IMAGE, self.image_family, "image family", f"e.g. {DEFAULT_IMAGE_FAMILY}")
        _need(_IMAGE, self.image_project, "image project", f"e.g. {DEFAULT_IMAGE_PROJECT}")
        if self.disk_gb < MIN_DISK_GB:
            raise ConfigError(
                f"boot disk of {self.disk_gb} GB is too small",
                hint=f"at least {MIN_DISK_GB} GB for a Deep Learning VM image plus checkpoints",
            )
        acc = self.accelerator
        wants = KNOWN_ACCELERATORS.get(acc.type) if acc else None
        if acc is not None and wants is not None and self.family != wants:
            raise ConfigError(
                f"{acc.type} GPUs attach only to {wants}-* machine types, not {self.machine_type}",
                hint=f"e.g. --machine-type {_example(wants)}",
            )
        if self.restart_on_preemption and not self.spot:
            raise ConfigError(
                "--restart-on-preemption needs --spot: only spot VMs are preempted",
                hint="add --spot (an on-demand VM is not preempted; GCE restarts it after "
                "host maintenance itself)",
            )

    @property
    def template(self) -> str:
        """The instance template of the managed instance group (``restart_on_preemption``)."""
        return template_name_for(self.name)

    @property
    def family(self) -> str:
        return self.machine_type.split("-", 1)[0]

    @property
    def region(self) -> str:
        return self.zone.rsplit("-", 1)[0]

    @property
    def has_gpu(self) -> bool:
        return self.accelerator is not None or self.family in GPU_FAMILIES


def _need(pattern: re.Pattern[str], value: str, what: str, hint: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(f"{value!r} is not a valid {what}", hint=hint)


def _example(family: str) -> str:
    return {
        "n1": "n1-standard-8",
        "g2": "g2-standard-8",
        "a2": "a2-highgpu-1g",
        "a3": "a3-highgpu-1g",
        "a4": "a4-highgpu-8g",
        "g4": "g4-standard-48",
    }.get(family, f"{family}-standard-8")


def instance_flags(
    vm: VmSpec, script_path: str | Path, *, job_id: str = "", termination: str = "STOP"
) -> list[str]:
    """The flags ``instances create`` and ``instance-templates create`` share (no project,
    no zone)."""
    argv = [f"--machine-type={vm.machine_type}"]
    if vm.accelerator is not None:
        argv.append(vm.accelerator.flag())
    if vm.has_gpu:
        argv.append("--maintenance-policy=TERMINATE")  # GPUs cannot live-migrate
    if vm.spot:
        argv += ["--provisioning-model=SPOT", f"--instance-termination-action={termination}"]
    argv += [
        f"--image-family={vm.image_family}",
        f"--image-project={vm.image_project}",
        f"--boot-disk-size={vm.disk_gb}GB",
        f"--boot-disk-type={vm.disk_type}",
    ]
    if vm.service_account:
        argv.append(f"--service-account={vm.service_account}")
    argv.append("--scopes=cloud-platform")  # GCS through the service account: no key files
    argv.append(f"--metadata-from-file=startup-script={script_path}")
    if vm.has_gpu:
        argv.append("--metadata=install-nvidia-driver=True")
    labels = {"colabjob": "job", **({"colabjob-job": _label(job_id)} if job_id else {})}
    labels.update({_label(k): _label(v) for k, v in vm.labels.items()})
    argv.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    return argv


def create_argv(
    vm: VmSpec, script_path: str | Path, *, job_id: str = "", gcloud: str = "gcloud"
) -> list[str]:
    """The ``gcloud compute instances create`` argv for ``vm`` with ``script_path`` as its
    startup script."""
    where = [f"--project={vm.project}", f"--zone={vm.zone}"]
    flags = instance_flags(vm, script_path, job_id=job_id)
    return [gcloud, "compute", "instances", "create", vm.name, *where, *flags]


def template_name_for(name: str) -> str:
    """``NAME-tmpl``, cut so that it stays a valid 63-character resource name."""
    return f"{name[:58].rstrip('-')}-tmpl"


def template_argv(
    vm: VmSpec, script_path: str | Path, *, job_id: str = "", gcloud: str = "gcloud"
) -> list[str]:
    """``gcloud compute instance-templates create NAME-tmpl`` (global) for a group's VM.

    DELETE on preemption: the group recreates a deleted VM as it would a stopped one, and a
    deleted VM bills no disk while it waits for spot capacity."""
    flags = instance_flags(vm, script_path, job_id=job_id, termination="DELETE")
    project = f"--project={vm.project}"
    return [gcloud, "compute", "instance-templates", "create", vm.template, project, *flags]


def group_argv(vm: VmSpec, *, gcloud: str = "gcloud") -> list[str]:
    """``gcloud compute instance-groups managed create NAME --size=1`` from the template."""
    return [
        gcloud,
        "compute",
        "instance-groups",
        "managed",
        "create",
        vm.name,
        f"--project={vm.project}",
        f"--zone={vm.zone}",
        f"--template={vm.template}",
        "--size=1",
    ]


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_cli(
    argv: Sequence[str],
    *,
    missing: HandoffError,
    runner: Runner = subprocess.run,
    timeout: float,
    error: type[HandoffError] = HandoffError,
    failed_hint: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run an external CLI (gcloud, sky, kaggle) with argv[0] resolved on PATH.

    ``missing`` is raised when it is not there, ``error`` when it cannot be started or runs
    past ``timeout``. With ``failed_hint`` a non-zero exit raises ``HandoffError`` with the
    tail of its output; without, the caller judges the exit status."""
    path = shutil.which(argv[0])
    if path is None:
        raise missing
    try:
        done = runner([path, *argv[1:]], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise error(f"could not run {shlex.join(list(argv[:4]))}: {e}") from e
    if failed_hint is not None and done.returncode != 0:
        raise HandoffError(
            f"`{shlex.join(list(argv))}` failed (exit {done.returncode}):\n"
            f"{describe_failure(done)}",
            hint=failed_hint,
        )
    return done


def run_gcloud(
    argv: Sequence[str], *, runner: Runner = subprocess.run, timeout: float = 600.0
) -> subprocess.CompletedProcess[str]:
    """Run gcloud (argv[0] resolved on PATH); ``GcloudError`` if it cannot be started."""
    missing = GcloudError(
        f"{argv[0]} (the Google Cloud CLI) is not installed or not on PATH",
        hint="install it (https://cloud.google.com/sdk/docs/install; Colab has it), "
        "or pass --dry-run to only print the command",
    )
    return run_cli(argv, missing=missing, runner=runner, timeout=timeout, error=GcloudError)


def check_gcloud(*, gcloud: str = "gcloud", runner: Runner = subprocess.run) -> str:
    """The active gcloud account; ``GcloudError`` if gcloud is missing or nobody is logged in."""
    argv = [gcloud, "auth", "list", "--filter=status:ACTIVE", "--format=value(account)"]
    done = run_gcloud(argv, runner=runner, timeout=120.0)
    if done.returncode != 0:
        raise GcloudError(
            f"`{shlex.join(argv)}` failed (exit {done.returncode}): {_tail(done.stderr)}",
            hint="check the gcloud installation (`gcloud info`)",
        )
    accounts = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if not accounts:
        raise GcloudError(
            "gcloud is not authenticated: no active account",
            hint="run `gcloud auth login` (in Colab: `from google.colab import auth; "
            "auth.authenticate_user()`), then try again",
        )
    return accounts[0]


def describe_failure(done: subprocess.CompletedProcess[Any]) -> str:
    """The useful part of a failed gcloud run."""
    return _tail(str(done.stderr or done.stdout or ""))
