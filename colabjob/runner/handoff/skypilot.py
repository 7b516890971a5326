"""Hand a paused job to a SkyPilot managed job (``colabjob handoff --engine skypilot``).

``SkyTask`` validates what the user typed; ``render_task`` builds the task (a dict that
``task_yaml`` writes as YAML): ``setup`` installs colabjob pinned to this version, ``run``
resumes the job from its ``gs://`` URL (with SkyPilot's node variables when ``num_nodes`` >
1), ``resources`` asks for the GPUs, spot and cloud. ``handoff_skypilot`` shares the GCE
path's checks and verified copy (``prepare.prepare_job``, ``prepare.move_job``), then runs
``sky jobs launch -n NAME -y TASK.yaml``.

Preemption recovery is SkyPilot's: its controller relaunches the task on a new cluster when
the old one is gone, and ``run`` resumes from the newest committed checkpoint. It tells a
preemption from a user failure by the cluster's state a few seconds after the job ends, so on
a preemption (exit 75 and the GCE metadata server says ``preempted``) ``run`` does not exit:
it waits for the VM to go, and SkyPilot sees a preempted cluster. A pause for another reason
(``colabjob stop``) exits 75, which SkyPilot records as a failure and does not relaunch, as
the GCE startup script powers its VM off. No credentials in the task: the cluster's service
account (SkyPilot's cloud credentials) reaches GCS. Torch-free.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import colabjob
from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import ConfigError, ExitCode, SkyNotFoundError
from colabjob.runner.handoff.gcloud import Runner, instance_name_for, run_cli
from colabjob.runner.handoff.prepare import move_job, prepare_job, write_plan_file
from colabjob.runner.handoff.startup_script import TORCH_CPU_INDEX, checked_value
from colabjob.runner.handoff.transfer import TransferReport

__all__ = [
    "MAX_NODES",
    "SKY_INSTALL",
    "SkyPlan",
    "SkyTask",
    "handoff_skypilot",
    "launch_argv",
    "render_task",
    "task_yaml",
]

SKY_INSTALL = 'pip install "skypilot[gcp]"'
MAX_NODES = 64  # a bound on what a typo can order
PREEMPTED_WAIT_S = 300  # GCE hard-stops a preempted VM 30 s after the notice

_GPUS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(?::[0-9]+)?")
_CLOUD = re.compile(r"[a-z][a-z0-9]*")
_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True, kw_only=True)
class SkyTask:
    """The managed job to launch. Validated on construction (``ConfigError`` with a hint)."""

    name: str
    job_url: str  # gs://
    version: str  # the colabjob version to install
    gpus: str | None = None  # SkyPilot's NAME:COUNT, e.g. L4:1
    nodes: int = 1
    spot: bool = False
    cloud: str = "gcp"
    extra_packages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.job_url.startswith("gs://"):
            raise ConfigError(
                f"a SkyPilot task resumes from GCS; {self.job_url!r} is not a gs:// URL",
                hint="hand off with --to gs://BUCKET/PATH",
            )
        if self.gpus is not None and not _GPUS.fullmatch(self.gpus):
            raise ConfigError(
                f"--gpus {self.gpus!r} is not SkyPilot's NAME:COUNT",
                hint="e.g. --gpus L4:1, --gpus A100:8 (`sky show-gpus` lists them)",
            )
        if not 1 <= self.nodes <= MAX_NODES:
            raise ConfigError(f"--nodes {self.nodes} is not in 1..{MAX_NODES}")
        if not _CLOUD.fullmatch(self.cloud):
            raise ConfigError(f"--cloud {self.cloud!r} is not a cloud name", hint="e.g. gcp")
        if not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"{self.name!r} is not a valid SkyPilot job name",
                hint="lowercase letters, digits and '-', starting with a letter",
            )
        for value in (self.job_url, self.version, *self.extra_packages):
            checked_value("a task value", value)


def _setup(task: SkyTask) -> str:
    torch = (
        ""
        if task.gpus
        else f"pip install --quiet torch --index-url {shlex.quote(TORCH_CPU_INDEX)}\n"
    )
    packages = " ".join(shlex.quote(p) for p in (f"colabjob=={task.version}", *task.extra_packages))
    return (
        "set -euo pipefail\n"
        "# SkyPilot runs this on every new cluster, i.e. again after each preemption.\n"
        f"{torch}pip install --quiet --disable-pip-version-check {packages}\n"
    )


def _run(task: SkyTask) -> str:
    platform = " --platform gce" if task.cloud == "gcp" else ""  # GCE's preemption notice
    nodes = (
        ' --nnodes "$SKYPILOT_NUM_NODES" --node-rank "$SKYPILOT_NODE_RANK"'
        ' --master-addr "$(echo "$SKYPILOT_NODE_IPS" | head -n1)"'
        if task.nodes > 1
        else ""
    )
    return f"""\
set -uo pipefail
METADATA="http://${{GCE_METADATA_HOST:-metadata.google.internal}}/computeMetadata/v1"
rc=0
colabjob resume "$COLABJOB_JOB_URL"{platform}{nodes} || rc=$?
if [ "$rc" -eq {int(ExitCode.PAUSED)} ] && [ "$(curl -fsS --max-time 5 \\
    -H 'Metadata-Flavor: Google' "$METADATA/instance/preempted" 2>/dev/null)" = TRUE ]; then
  # Committed, and the VM goes within 30 s: SkyPilot must find a preempted cluster, not a
  # failed job, to relaunch the task (which resumes from the newest commit).
  echo "colabjob: preempted after a committed checkpoint; waiting for the VM to stop"
  sleep {PREEMPTED_WAIT_S}
fi
exit "$rc"
"""


def render_task(task: SkyTask) -> dict[str, Any]:
    """The SkyPilot task as a dict (``task_yaml`` writes it)."""
    resources: dict[str, Any] = {"infra": task.cloud}
    if task.gpus:
        resources["accelerators"] = task.gpus
    resources["use_spot"] = task.spot
    return {
        "name": task.name,
        "num_nodes": task.nodes,
        "resources": resources,
        "envs": {"COLABJOB_JOB_URL": task.job_url, "PYTHONUNBUFFERED": "1"},
        "setup": _setup(task),
        "run": _run(task),
    }


def task_yaml(task: SkyTask) -> str:
    head = (
        f"# SkyPilot task written by `colabjob handoff --engine skypilot` (colabjob "
        f"{task.version}).\n# Launch: sky jobs launch -n {task.name} -y THIS.yaml\n"
    )
    return head + yaml.dump(render_task(task), Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the scripts) as literal blocks: the YAML reads like the shell."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def launch_argv(task_path: str, name: str, *, sky: str = "sky") -> list[str]:
    return [sky, "jobs", "launch", "-n", name, "-y", task_path]


def run_sky(
    argv: Sequence[str], *, runner: Runner = subprocess.run, timeout: float = 1800.0
) -> subprocess.CompletedProcess[str]:
    """Run ``sky`` (argv[0] resolved on PATH); ``SkyNotFoundError`` when it is missing."""
    missing = SkyNotFoundError(
        f"{argv[0]} (the SkyPilot CLI) is not installed or not on PATH",
        hint=f"{SKY_INSTALL}, then `sky check gcp`; or pass --dry-run to only write the task",
    )
    hint = (
        "the job is on GCS and nothing runs yet: fix the cause (`sky check` shows "
        "the clouds SkyPilot may use) and run the same command again"
    )
    return run_cli(argv, missing=missing, runner=runner, timeout=timeout, failed_hint=hint)


@dataclass(frozen=True, kw_only=True)
class SkyPlan:
    """What a SkyPilot handoff did (or, with ``dry_run``, would do)."""

    job_url: str
    run_url: str
    task: SkyTask
    task_path: Path
    argv: tuple[str, ...]
    transfer: TransferReport | None = None
    copy_needed: bool = False
    dry_run: bool = False
    launched: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def next_steps(self) -> list[str]:
        if self.dry_run:
            steps = ["dry run: nothing was copied, marked or launched"]
            if self.copy_needed:
                steps.append(f"without --dry-run the job is first copied to {self.run_url}")
            return [*steps, f"task: {self.task_path}", f"command: {self.command}"]
        return [
            f"managed job {self.task.name} launched; it installs colabjob {self.task.version} "
            f"and resumes {self.run_url}; SkyPilot relaunches it after a preemption",
            f"follow it: sky jobs logs -n {self.task.name}",
            f"job status: colabjob status {self.run_url}",
            f"stop it: colabjob stop {self.run_url} (commits a checkpoint), or "
            f"sky jobs cancel -n {self.task.name}",
        ]


def handoff_skypilot(
    job_url: str,
    *,
    gpus: str | None = None,
    nodes: int = 1,
    spot: bool = False,
    cloud: str = "gcp",
    to: str | None = None,
    dry_run: bool = False,
    name: str | None = None,
    extra_packages: Sequence[str] = (),
    task_path: str | Path | None = None,
    sky: str = "sky",
    runner: Runner = subprocess.run,
    clock: Clock = SYSTEM_CLOCK,
    log: Callable[[str], None] | None = None,
) -> SkyPlan:
    """Move the job at ``job_url`` to a SkyPilot managed job (see the module docstring)."""
    say = log or (lambda _msg: None)
    job = prepare_job(job_url, to=to, clock=clock, extra_packages=extra_packages)
    task = SkyTask(
        name=name or instance_name_for(job.record.job_id),
        job_url=job.dst.url,
        version=colabjob.__version__,
        gpus=gpus,
        nodes=nodes,
        spot=spot,
        cloud=cloud,
        extra_packages=tuple(extra_packages),
    )
    warnings = list(job.warnings)
    if cloud != "gcp":
        warnings.append(
            f"on {cloud} the cluster reaches GCS only with credentials SkyPilot copies there "
            "(your gcloud application-default login); the GCE preemption notice is not watched"
        )
    path = write_plan_file(task_yaml(task), task_path, f"{task.name}-task.yaml")
    plan = SkyPlan(
        job_url=job.src.url,
        run_url=job.dst.url,
        task=task,
        task_path=path,
        argv=tuple(launch_argv(str(path), task.name, sky=sky)),
        copy_needed=job.copy_needed,
        dry_run=dry_run,
        warnings=tuple(warnings),
    )
    if dry_run:
        return plan
    if shutil.which(sky) is None:  # before anything moves
        run_sky(plan.argv, runner=runner)
    if job.copy_needed:
        report = move_job(job.src, job.dst, clock=clock, say=say)
        plan = dataclasses.replace(plan, transfer=report)
    say(f"launching: {plan.command}")
    run_sky(plan.argv, runner=runner)
    return dataclasses.replace(plan, launched=True)
