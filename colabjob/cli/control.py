"""Commands that steer a running job from anywhere: ``stop`` and ``watchdog``.

``stop`` writes a stop request into the job's storage; the live runner's watchdog sees it,
checkpoints at the next step boundary and exits 75 (``--cancel``: and marks the job
CANCELLED). With no live runner, ``--cancel`` moves the job to CANCELLED at once.
``watchdog`` is the terminal version of the notebook watchdog cell: one status line,
refreshed until the job stops running or you press Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time

from colabjob.cli.common import note, open_job
from colabjob.errors import ExitCode


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("stop", parents=[common], help="ask a job's runner to checkpoint and stop")
    p.add_argument("job", metavar="JOB_URL")
    p.add_argument("--cancel", action="store_true", help="and never resume it (CANCELLED)")
    p.add_argument("--reason", default="", help="words recorded with the request")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("watchdog", parents=[common], help="watch a job (blocking status line)")
    p.add_argument("job", metavar="JOB_URL")
    p.add_argument("--refresh", default="30s", help="how often to read the job (default 30s)")
    p.add_argument(
        "--stop-lead",
        default="15m",
        help="ask the runner to stop when this little of the session is left and it does not "
        "know the deadline itself ('none': never; default 15m)",
    )
    p.add_argument("--budget", help="this session's length (11h30m, colab-pro, ...)")
    p.add_argument("--platform", help="colab, colab-pro, kaggle, slurm, gce, local")
    p.add_argument("--session-started-at", metavar="WHEN", help="when this session began")
    p.set_defaults(func=cmd_watchdog)


def cmd_stop(args: argparse.Namespace) -> int:
    from colabjob.runner.lease.info import LeaseObserver
    from colabjob.runner.record import JobRecord, update_record
    from colabjob.runner.states import JobEvent, JobState, LeaseStatus, is_terminal
    from colabjob.runner.stop_request import request_stop

    store, record = open_job(args.job)
    if is_terminal(record.state):
        note(f"colabjob: job {record.job_id} is already {record.state.value}; nothing to stop")
        return ExitCode.DONE
    info, lease = LeaseObserver(store).poll()
    live = info is not None and lease in (LeaseStatus.LIVE, LeaseStatus.STALE)
    if live and info is not None:
        request_stop(store, cancel=args.cancel, reason=args.reason)
        what = "checkpoint, stop and cancel" if args.cancel else "checkpoint and stop"
        note(
            f"colabjob: asked the runner on {info.holder.describe()} to {what} at its next "
            f"step boundary; `colabjob status {store.url}` shows when it has"
        )
        return ExitCode.DONE
    if not args.cancel:
        note(
            f"colabjob: job {record.job_id} is not running ({record.state.value}); nothing to stop"
        )
        return ExitCode.DONE

    def cancel(r: JobRecord) -> JobRecord:
        if r.state is JobState.RUNNING:  # its runner is gone (no live lease)
            r = r.apply(JobEvent.EXPIRE)
        return r.apply(JobEvent.CANCEL)

    update_record(store, cancel)
    note(f"colabjob: job {record.job_id} cancelled")
    return ExitCode.DONE


def cmd_watchdog(args: argparse.Namespace) -> int:
    from colabjob.display import is_plain
    from colabjob.notebook import watchdog
    from colabjob.runner.platforms import parse_duration
    from colabjob.runner.states import JobState

    open_job(args.job)  # fail now (exit 2) if there is no job there
    plain = is_plain(sys.stdout)

    def show(line: str) -> None:
        if plain:
            print(line, flush=True)
        else:
            sys.stdout.write("\r\x1b[2K" + line)
            sys.stdout.flush()

    lead = None if str(args.stop_lead).lower() == "none" else args.stop_lead
    dog = watchdog(
        args.job,
        refresh=args.refresh,
        stop_lead=lead,
        budget=args.budget,
        platform=args.platform,
        session_started_at=args.session_started_at,
        display=show,
    )
    refresh = parse_duration(args.refresh, what="refresh")
    finished = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}
    try:
        while True:
            time.sleep(min(refresh, 1.0))
            view = dog.last
            if view is not None and view.state in finished:
                break
    except KeyboardInterrupt:
        pass
    finally:
        dog.stop()
        if not plain:
            sys.stdout.write("\n")
    return ExitCode.DONE
