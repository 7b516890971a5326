"""``colabjob repair JOB``: rebuild a lost or corrupt ``job.json`` from the newest valid
checkpoint (``colabjob.runner.repair``), then ``colabjob resume JOB`` continues the job.
It refuses while a runner holds the job, never overwrites a valid record without
``--force``, keeps the old bytes next to the new record, and prints what it did."""

from __future__ import annotations

import argparse

from colabjob.cli.common import note
from colabjob.errors import ExitCode


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "repair", parents=[common], help="rebuild job.json from the newest valid checkpoint"
    )
    p.add_argument("job", metavar="JOB_URL")
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even a valid job.json (the current one is kept as a backup)",
    )
    p.set_defaults(func=cmd_repair)


def cmd_repair(args: argparse.Namespace) -> int:
    from colabjob.errors import ConfigError
    from colabjob.runner.lease.info import LeaseObserver
    from colabjob.runner.repair import repair_record
    from colabjob.runner.states import LeaseStatus
    from colabjob.storage.store import open_store

    store = open_store(args.job)
    info, lease = LeaseObserver(store).poll()
    if info is not None and lease in (LeaseStatus.LIVE, LeaseStatus.STALE):
        raise ConfigError(
            f"a runner on {info.holder.describe()} holds the job at {store.url}",
            hint="stop it first (colabjob stop JOB_URL), then repair",
        )
    done = repair_record(store, force=args.force)
    if done.replaced is None:
        what = "job.json was missing"
    else:
        what = f"job.json replaced ({done.replaced}); the old one is kept as {done.backup}"
    print(
        f"rebuilt {store.url}/job.json from checkpoint step {done.step} ({done.checkpoint}): "
        f"job {done.record.job_id}, state {done.record.state.value}, "
        f"lease epoch {done.record.epoch}; {what}"
    )
    note(f"colabjob: continue it with `colabjob resume {store.url}`")
    return ExitCode.DONE
