"""What several commands share: opening a job by URL, the default job location, the
per-session override flags, and printing to people (stdout for results, stderr for notes).
Nothing heavy is imported at module load.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from colabjob.config.run_sections import DEFAULT_MARGIN
from colabjob.errors import ConfigError

if TYPE_CHECKING:
    from colabjob.runner.record import JobRecord
    from colabjob.storage.store import Store

HOME_ENV = "COLABJOB_HOME"


def note(line: str) -> None:
    """A line for people, on stderr (stdout stays parseable: JSON, JSONL, tables)."""
    print(line, file=sys.stderr, flush=True)


def warn(warnings: Iterable[str]) -> None:
    """Each of a plan's warnings as a ``colabjob: warning:`` note."""
    for warning in warnings:
        note(f"colabjob: warning: {warning}")


def open_job(url: str) -> tuple[Store, JobRecord]:
    """The job's store and record; exit 2 with a hint when there is no job at ``url``."""
    from colabjob.runner.record import read_record
    from colabjob.storage.store import open_store

    store = open_store(url)
    got = read_record(store)
    if got is None:
        raise ConfigError(
            f"no job at {store.url} (job.json is missing)",
            hint="check the URL; `colabjob ls ROOT` lists the jobs under a storage root, "
            "`colabjob start SPEC` creates one",
        )
    return store, got[0]


def default_job_url(name: str) -> str:
    """Where a job lives when neither ``--storage`` nor ``job.storage`` says: under
    ``$COLABJOB_HOME``, else the mounted Colab Drive (``MyDrive/colabjob``), else
    ``./colabjob-jobs`` (a local disk: fine on your machine, lost with a Colab VM)."""
    from colabjob.storage.store import drive_root

    home = os.environ.get(HOME_ENV)
    if home:
        return f"{home.rstrip('/')}/{name}"
    my_drive = os.path.join(drive_root(), "MyDrive")
    if os.path.isdir(my_drive):
        return os.path.join(my_drive, "colabjob", name)
    return os.path.join(os.getcwd(), "colabjob-jobs", name)


def add_session_flags(p: argparse.ArgumentParser) -> None:
    """Flags that describe this session (never saved with the job)."""
    g = p.add_argument_group("this session")
    g.add_argument("--budget", help="session length: 11h30m, 90m, colab-pro, none, ...")
    g.add_argument("--platform", help="colab, colab-pro, kaggle, slurm, gce, local")
    g.add_argument(
        "--session-started-at",
        metavar="WHEN",
        help="when this session began (ISO 8601, epoch seconds, or '3h ago')",
    )
    g.add_argument(
        "--margin", help=f"time kept free after the final save (default {DEFAULT_MARGIN})"
    )
    g.add_argument(
        "--allow-geometry-change",
        action="store_true",
        help="resume with a different batch size / accumulation (no longer exact)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="retry a crashed segment from the last checkpoint N times (default 2)",
    )
    g.add_argument(
        "--retry-backoff",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="wait before the first retry; doubles each time (default 5)",
    )
    g.add_argument(
        "--progress",
        choices=("auto", "rich", "plain", "none"),
        default="auto",
        help="progress display (auto: rich on a terminal, plain lines elsewhere)",
    )
    g.add_argument(
        "--wandb",
        action="append_const",
        dest="overrides",
        const="logging.wandb=true",
        default=[],
        help="log to Weights & Biases, one run resumed every session "
        "(same as --set logging.wandb=true; needs the wandb package)",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set training.lr=1e-4 (repeatable)",
    )


def check_session_flags(args: argparse.Namespace) -> None:
    """Parse the session flags now, so a typo fails before anything is written."""
    from colabjob.runner.platforms import describe_platform, parse_duration

    describe_platform(
        platform=args.platform, budget=args.budget, session_started_at=args.session_started_at
    )
    if args.margin is not None:
        parse_duration(args.margin, what="margin")
    if args.retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {args.retries}")
    if args.retry_backoff < 0:
        raise ConfigError(f"--retry-backoff must be >= 0, got {args.retry_backoff}")
