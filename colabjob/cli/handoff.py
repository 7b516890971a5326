"""``colabjob handoff``: the argparse face of ``colabjob.runner.handoff.to_vm``.

``configure_parser(subparsers, common)`` adds the subcommand; ``cmd_handoff(args)`` runs it,
prints the plan (the exact gcloud command, warnings, what to do next) and returns 0 when the
VM was created or the dry run printed its command (``--restart-on-preemption``: an instance
template and a managed instance group of size 1, two commands). ``--engine skypilot`` goes to
``colabjob.runner.handoff.skypilot`` instead: the task YAML and ``sky jobs launch``. Like
every other command it raises ``ColabJobError`` for ``colabjob.cli.main`` to print with its
hint and turn into the exit code: 2 for bad arguments, a missing or logged-out gcloud (or
sky), a job that is not paused or was moved; 1 when gcloud (or sky) could not launch it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TextIO

from colabjob.cli.common import warn
from colabjob.errors import ConfigError
from colabjob.runner.handoff.gcloud import (
    DEFAULT_DISK_GB,
    DEFAULT_IMAGE_FAMILY,
    DEFAULT_IMAGE_PROJECT,
)

__all__ = ["cmd_handoff", "configure_parser"]

EXAMPLE = """\
example (a job on Drive, to a spot L4 VM):
  colabjob handoff /content/drive/MyDrive/jobs/run1 --to gs://my-bucket/jobs/run1 \\
      --project my-project --zone us-central1-a --machine-type g2-standard-8 --spot
example (the same, recreated by a managed instance group after each spot preemption):
  colabjob handoff gs://my-bucket/jobs/run1 --project my-project --zone us-central1-a \\
      --machine-type g2-standard-8 --spot --restart-on-preemption
example (a SkyPilot managed job that SkyPilot relaunches after each preemption):
  colabjob handoff gs://my-bucket/jobs/run1 --engine skypilot --gpus L4:1 --spot
"""


def configure_parser(
    subparsers: Any, common: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser:
    """Add ``handoff`` to ``subparsers`` (from ``parser.add_subparsers()``); ``common`` is a
    parent parser with the flags every command shares (``--debug``)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "handoff",
        parents=[common] if common is not None else [],
        help="move a paused job to a GCP VM that resumes it and powers off when done",
        description="Copy the job to GCS if needed (verified), mark the old location as "
        "moved, and create a GCE VM whose startup script resumes the job and powers the VM "
        "off when it completes, fails or pauses; or, with --engine skypilot, launch a "
        "SkyPilot managed job that resumes it and is relaunched after each preemption.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "job_url", metavar="JOB_URL", help="the job: a Drive path, local path, gs:// or s3://"
    )
    p.add_argument(
        "--engine",
        choices=("gce", "skypilot"),
        default="gce",
        help="gce: one VM made with gcloud (default); skypilot: a SkyPilot managed job, "
        "relaunched by SkyPilot after a preemption",
    )
    p.add_argument("--project", help="GCP project id (gce)")
    p.add_argument("--zone", help="e.g. us-central1-a (gce)")
    p.add_argument("--machine-type", help="e.g. g2-standard-8, n1-standard-8 (gce)")
    p.add_argument("--gpus", metavar="NAME:COUNT", help="e.g. L4:1 (skypilot)")
    p.add_argument("--nodes", type=int, default=1, help="machines (skypilot; default 1)")
    p.add_argument("--cloud", default="gcp", help="SkyPilot's cloud (skypilot; default gcp)")
    p.add_argument(
        "--accelerator",
        metavar="type=TYPE,count=N",
        help="GPUs to attach, e.g. type=nvidia-tesla-t4,count=1 (g2/a2/a3 types have theirs)",
    )
    p.add_argument(
        "--spot", action="store_true", help="spot VM (60-91%% cheaper, preemptible: 30 s notice)"
    )
    p.add_argument(
        "--restart-on-preemption",
        action="store_true",
        help="gce with --spot: run the VM in a managed instance group of size 1, which "
        "recreates it after a preemption (the job resumes); it resizes to 0 when done",
    )
    p.add_argument(
        "--to", metavar="gs://BUCKET/PATH", help="copy the job here first (required off GCS)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check and print the gcloud command; change nothing"
    )
    p.add_argument("--name", help="VM name (default: colabjob-<job id>)")
    p.add_argument("--image-family", default=DEFAULT_IMAGE_FAMILY)
    p.add_argument("--image-project", default=DEFAULT_IMAGE_PROJECT)
    p.add_argument("--disk-gb", type=int, default=DEFAULT_DISK_GB, help="boot disk size in GB")
    p.add_argument("--service-account", help="VM service account email (default: compute's)")
    p.add_argument(
        "--notify-secret",
        metavar="NAME",
        help="gce: a Secret Manager secret holding the notification URLs; the VM reads it "
        "into COLABJOB_NOTIFY before each resume (the URLs never enter the startup script)",
    )
    p.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="extra package to install on the VM (repeatable), e.g. your training code",
    )
    p.add_argument(
        "--script-out", metavar="PATH", help="where to write the startup script (or task YAML)"
    )
    p.set_defaults(func=cmd_handoff)
    return p


def cmd_handoff(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run ``colabjob handoff`` from parsed ``args``; return the exit code."""
    from colabjob.runner.handoff.to_vm import handoff

    stdout = out or sys.stdout

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.engine == "skypilot":
        if getattr(args, "restart_on_preemption", False):
            raise ConfigError(
                "--restart-on-preemption is for --engine gce",
                hint="SkyPilot managed jobs are relaunched after a preemption already: "
                "drop the flag",
            )
        return _skypilot(args, stdout, say)
    missing = [f for f in ("project", "zone", "machine_type") if getattr(args, f) is None]
    if missing:
        flags = ", ".join("--" + f.replace("_", "-") for f in missing)
        raise ConfigError(
            f"the gce engine needs {flags}",
            hint="e.g. --project my-project --zone us-central1-a --machine-type g2-standard-8",
        )
    plan = handoff(
        args.job_url,
        project=args.project,
        zone=args.zone,
        machine_type=args.machine_type,
        accelerator=args.accelerator,
        spot=args.spot,
        restart_on_preemption=args.restart_on_preemption,
        to=args.to,
        dry_run=args.dry_run,
        image_family=args.image_family,
        image_project=args.image_project,
        disk_gb=args.disk_gb,
        name=args.name,
        service_account=args.service_account,
        extra_packages=tuple(args.pip),
        script_path=args.script_out,
        notify_secret=args.notify_secret,
        log=say,
    )
    return _report(plan, stdout)


def _skypilot(args: argparse.Namespace, stdout: TextIO, say: Callable[[str], None]) -> int:
    from colabjob.runner.handoff.skypilot import handoff_skypilot

    plan = handoff_skypilot(
        args.job_url,
        gpus=args.gpus,
        nodes=args.nodes,
        spot=args.spot,
        cloud=args.cloud,
        to=args.to,
        dry_run=args.dry_run,
        name=args.name,
        extra_packages=tuple(args.pip),
        task_path=args.script_out,
        log=say,
    )
    return _report(plan, stdout, dry_run_first=plan.task_path.read_text() if plan.dry_run else None)


def _report(plan: Any, stdout: TextIO, *, dry_run_first: str | None = None) -> int:
    """What either engine's plan says: warnings, the copy, then the command and the next
    steps (a dry run shows ``dry_run_first``, e.g. the task file, and comments the steps)."""
    warn(plan.warnings)
    if plan.transfer is not None:
        print(plan.transfer.describe(), file=stdout)
    if plan.dry_run:
        if dry_run_first is not None:
            print(dry_run_first, file=stdout)
        print(plan.command, file=stdout)
        for line in plan.next_steps()[:-1]:
            print(f"# {line}", file=stdout)
    else:
        for line in plan.next_steps():
            print(line, file=stdout)
    return 0
