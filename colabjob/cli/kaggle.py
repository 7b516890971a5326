"""``colabjob kaggle push``: the argparse face of ``colabjob.runner.handoff.kaggle_chain``.

``push JOB --kernel USER/SLUG [--gpu] [--chain]`` writes the kernel folder (metadata and
script) and pushes it with Kaggle's ``kaggle`` CLI; ``--dry-run`` only writes it and prints
the command. Exit 0 when pushed (or written), 2 for bad arguments, a job off GCS, a job that
is finished, moved or running, a missing ``kaggle`` CLI; 1 when the push failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, TextIO

from colabjob.cli.common import warn
from colabjob.runner.handoff.kaggle import (
    DEFAULT_MAX_VERSIONS,
    DEFAULT_WEEKLY_GPU_HOURS,
    SECRET_GCP_KEY,
    SECRET_KAGGLE,
)

__all__ = ["add_parsers", "cmd_kaggle_push"]

EXAMPLE = """\
example (a GPU kernel that pushes its next version each time a session ends):
  colabjob kaggle push gs://my-bucket/jobs/run1 --kernel alice/colabjob-run1 --gpu --chain
secrets (Kaggle editor: Add-ons > Secrets, attached to the kernel once):
  GCP_SA_KEY                a service-account JSON key for the job's bucket
  KAGGLE_USERNAME, KAGGLE_KEY  your API token, needed by --chain to push the next version
"""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("kaggle", parents=[common], help="run a job in a Kaggle kernel")
    kaggle_sub = p.add_subparsers(dest="kaggle_command", metavar="COMMAND", required=True)
    push = kaggle_sub.add_parser(
        "push",
        parents=[common],
        help="write a kernel that resumes the job and push it with the kaggle CLI",
        description="Write a private Python-script kernel (GPU and internet as asked) that "
        "installs this colabjob version and runs `colabjob resume JOB`, and push it with "
        "`kaggle kernels push -p DIR`. The job must be on GCS: a kernel's disk does not "
        "outlive it.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("job_url", metavar="JOB_URL", help="the job, on gs://")
    push.add_argument("--kernel", required=True, metavar="USER/SLUG", help="the kernel's id")
    push.add_argument("--gpu", action="store_true", help="run on a GPU (counts against quota)")
    push.add_argument(
        "--chain",
        action="store_true",
        help="when a session ends (paused at its limit), push the next version, which "
        "resumes the job; needs the KAGGLE_USERNAME/KAGGLE_KEY secrets",
    )
    push.add_argument(
        "--max-versions",
        type=int,
        default=DEFAULT_MAX_VERSIONS,
        metavar="N",
        help=f"push at most N versions in all (default {DEFAULT_MAX_VERSIONS})",
    )
    push.add_argument(
        "--weekly-gpu-hours",
        type=float,
        default=DEFAULT_WEEKLY_GPU_HOURS,
        metavar="H",
        help="your weekly Kaggle GPU quota; the chain stops with less than an hour of it "
        f"left (default {DEFAULT_WEEKLY_GPU_HOURS:g})",
    )
    push.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="USER/SLUG",
        help="a Kaggle dataset to attach, read-only under /kaggle/input/SLUG (repeatable)",
    )
    push.add_argument(
        "--pip", action="append", default=[], metavar="PACKAGE", help="extra package to install"
    )
    push.add_argument("--dir", metavar="DIR", help="where to write the kernel (./kaggle-SLUG)")
    push.add_argument("--dry-run", action="store_true", help="write the kernel; push nothing")
    push.set_defaults(func=cmd_kaggle_push)


def cmd_kaggle_push(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    from colabjob.runner.handoff.kaggle_chain import push_kernel
    from colabjob.runner.platforms import format_duration

    stdout = out or sys.stdout
    plan = push_kernel(
        args.job_url,
        kernel=args.kernel,
        gpu=args.gpu,
        chain=args.chain,
        max_versions=args.max_versions,
        weekly_gpu_hours=args.weekly_gpu_hours,
        datasets=tuple(args.dataset),
        extra_packages=tuple(args.pip),
        folder=args.dir,
        dry_run=args.dry_run,
    )
    warn(plan.warnings)
    command = shlex.join(plan.argv)
    budget = "" if plan.budget_s is None else f", budget {format_duration(plan.budget_s)}"
    print(f"kernel: {plan.folder} ({plan.kernel.kernel}{budget})", file=stdout)
    if plan.dry_run:
        print(f"# dry run: nothing pushed; push it with: {command}", file=stdout)
    else:
        print(f"pushed: {command}", file=stdout)
        print(f"follow it: kaggle kernels status {plan.kernel.kernel}", file=stdout)
    secrets = [SECRET_GCP_KEY, *(SECRET_KAGGLE if plan.kernel.chain else ())]
    print(f"attach the Kaggle secrets {', '.join(secrets)} to the kernel (Add-ons > "
          "Secrets) if it has not got them", file=stdout)  # fmt: skip
    print(f"job status: colabjob status {plan.kernel.job_url}", file=stdout)
    return 0
