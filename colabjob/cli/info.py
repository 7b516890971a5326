"""Commands that read a job: ``status``, ``ls``, ``logs``, ``plot``, ``gc``.

``status`` and ``ls`` read only small control objects (no torch, no checkpoint bytes) and
print key/value lines or a table (``--json`` for scripts). ``logs`` prints the committed
metrics and the job's events as JSON Lines (``--follow`` polls until the job stops
running). ``plot`` writes a PNG of loss and learning rate with the session boundaries.
``gc`` applies retention, sweeps abandoned staging prefixes and reports the space used.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from colabjob.cli.common import note, open_job
from colabjob.errors import ExitCode

if TYPE_CHECKING:
    from colabjob.cli.summary import JobSummary



def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="where a job stands, and its ETA")
    p.add_argument("job", metavar="JOB_URL")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ls", parents=[common], help="list the jobs under a storage root")
    p.add_argument("root", metavar="ROOT_URL")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("logs", parents=[common], help="committed metrics and events (JSONL)")
    p.add_argument("job", metavar="JOB_URL")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing while it runs")
    p.add_argument("--interval", type=float, default=10.0, help="--follow poll seconds")
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write the committed metrics as a TensorBoard event file under DIR",
    )
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("plot", parents=[common], help="loss and lr against step (PNG)")
    p.add_argument("job", metavar="JOB_URL")
    p.add_argument("-o", "--output", default="loss.png", help="PNG file (default loss.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("gc", parents=[common], help="apply retention, sweep staging, report")
    p.add_argument("job", metavar="JOB_URL")
    p.add_argument("--keep", type=int, help="checkpoints to keep (default: the job's)")
    p.set_defaults(func=cmd_gc)


# -- formatting --------------------------------------------------------------------------
def _ago(now: float, t: float | None) -> str:
    from colabjob.runner.platforms import format_duration

    return "-" if t is None else f"{format_duration(max(0.0, now - t))} ago"


def _fmt_step(step: int | None, total: int | None) -> str:
    if step is None:
        return "-"
    if total:
        return f"{step}/{total} ({100.0 * step / total:.0f}%)"
    return str(step)


def status_lines(s: JobSummary) -> list[str]:
    from colabjob.runner.lease.info import format_time
    from colabjob.runner.platforms import format_duration

    state = s.state.upper()
    if s.state != s.recorded_state:
        state += f" (recorded {s.recorded_state}; no live runner)"
    if s.lease in ("live", "stale") and s.holder:
        state += f" on {s.holder}, heartbeat {_ago(s.now, s.heartbeat_at)}"
        if s.lease == "stale":
            state += " (stale: the runner may be gone)"
        if s.lease_expires_at is not None:
            state += f", lease expires {format_time(s.lease_expires_at)}"
    if s.stop_requested:
        state += ", stop requested"
    ckpt = (
        "none yet"
        if s.checkpoint_step is None
        else f"step {s.checkpoint_step}, {_ago(s.now, s.checkpoint_at)}"
    )
    if s.checkpoint_mode and s.checkpoint_mode.startswith("synchronous"):  # background: usual
        ckpt += "; saving " + s.checkpoint_mode.replace("synchronous", "synchronously", 1)
    segs = f"{s.segments}"
    if s.crashes:
        segs += f" ({s.crashes} crashed)"
    if s.last_stop_reason:
        segs += f", last stop: {s.last_stop_reason}"
    if s.eta_seconds is None:
        eta = "unknown (needs a total step count and one finished segment)"
    elif s.eta_seconds == 0:
        eta = "done"
    else:
        eta = f"{format_duration(s.eta_seconds)} (about {format_time(s.now + s.eta_seconds)})"
        if s.steps_per_second:
            eta += f" at {s.steps_per_second:.3g} steps/s"
        if s.sessions_left is not None and s.session_limit:
            plural = "s" if s.sessions_left != 1 else ""
            eta += (
                f"; {s.sessions_left} {s.session_platform} session{plural} "
                f"of {format_duration(s.session_limit)}"
            )
    kind = f" ({s.kind})" if s.kind else ""
    return [
        f"job         {s.job_id}{kind} at {s.url}",
        f"state       {state}",
        f"step        {_fmt_step(s.step, s.total)}",
        f"checkpoint  {ckpt}",
        f"segments    {segs}",
        f"ETA         {eta}",
    ]


# -- status / ls -------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from colabjob.cli.summary import summarize

    store, record = open_job(args.job)
    summary = summarize(store, record, now=time.time())
    if args.json:
        print(json.dumps(summary.to_dict(), default=str))
    else:
        print("\n".join(status_lines(summary)))
    return ExitCode.DONE


def list_jobs(root: str) -> list[JobSummary]:
    """Summaries of the job at ``root`` itself, or of every ``root/*/job.json``."""
    from colabjob.cli.summary import summarize
    from colabjob.runner.record import read_record
    from colabjob.storage.store import open_store

    store = open_store(root)
    now = time.time()
    got = read_record(store)
    if got is not None:
        return [summarize(store, got[0], now=now)]
    out = []
    for name in store.list_dirs(""):
        child = store.child(name)
        got = read_record(child)
        if got is not None:
            out.append(summarize(child, got[0], now=now))
    return out


def cmd_ls(args: argparse.Namespace) -> int:
    from colabjob.display import print_table

    jobs = list_jobs(args.root)
    if args.json:
        for job in jobs:
            print(json.dumps(job.to_dict(), default=str))
        return ExitCode.DONE
    if not jobs:
        note(f"colabjob: no jobs under {args.root}")
        return ExitCode.DONE
    rows = [
        [
            j.job_id,
            j.kind or "-",
            j.state,
            "-" if j.step is None else f"{j.step}/{j.total}" if j.total else str(j.step),
            f"{j.segments}" + (f" ({j.crashes} crashed)" if j.crashes else ""),
            "-" if j.checkpoint_step is None else str(j.checkpoint_step),
            _ago(j.now, j.updated_at),
        ]
        for j in jobs
    ]
    headers = ["JOB", "KIND", "STATE", "STEP", "SEGMENTS", "CHECKPOINT", "UPDATED"]
    print_table(headers, rows, title=f"jobs under {args.root}")
    return ExitCode.DONE


# -- logs --------------------------------------------------------------------------------
def cmd_logs(args: argparse.Namespace) -> int:
    from colabjob.runner.history import job_log, load_history
    from colabjob.runner.lease.info import LeaseObserver
    from colabjob.runner.record import effective_state
    from colabjob.runner.states import JobState

    store, record = open_job(args.job)
    printed: Counter[str] = Counter()  # --follow: lines already shown by an earlier poll
    export = None
    if args.tensorboard:
        from colabjob.tensorboard import TensorBoardExport

        export = TensorBoardExport(args.tensorboard)
    while True:
        history = load_history(store, record)
        if export is not None:
            export.add_rows(history.rows)
            export.flush()
        for warning in history.warnings:
            note(f"colabjob: {warning}")
        now: Counter[str] = Counter()
        for item in job_log(history):
            line = json.dumps(item, default=str)
            now[line] += 1
            if now[line] > printed[line]:
                print(line, flush=True)
        printed |= now
        if not args.follow:
            break
        _, lease = LeaseObserver(store).poll()
        if effective_state(record, lease) is not JobState.RUNNING:
            note(f"colabjob: job is {effective_state(record, lease).value}; stopped following")
            break
        time.sleep(max(0.1, args.interval))
        _, record = open_job(args.job)
    if export is not None:
        export.close()
        note(f"colabjob: TensorBoard: {export.scalars} scalars in {args.tensorboard}")
    return ExitCode.DONE


# -- plot --------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    from colabjob.plot import plot_job

    store, _ = open_job(args.job)
    result = plot_job(store, args.output)
    marks = len(result.boundaries)
    note(
        f"colabjob: wrote {result.path} ({result.points} loss points, {marks} session "
        f"boundar{'y' if marks == 1 else 'ies'})"
    )
    return ExitCode.DONE


# -- gc ----------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_gc(args: argparse.Namespace) -> int:
    from colabjob.errors import ConfigError
    from colabjob.runner.lease.info import LeaseObserver
    from colabjob.runner.states import LeaseStatus
    from colabjob.storage.checkpoints import CheckpointStore

    store, record = open_job(args.job)
    keep = args.keep
    if keep is None:
        ckpt_cfg: Any = record.config.get("checkpoint") or {}
        keep = int(ckpt_cfg.get("keep", 2)) if isinstance(ckpt_cfg, dict) else 2
    if keep < 2:
        raise ConfigError(f"--keep {keep}: at least 2 checkpoints are kept")
    _, lease = LeaseObserver(store).poll()
    live = lease in (LeaseStatus.LIVE, LeaseStatus.STALE)
    ckpts = CheckpointStore(store, keep=keep)
    deleted = ckpts.apply_retention()
    swept = ckpts.sweep_staging(include_newer=not live)
    kept = ckpts.list()
    total = sum(store.size(key) for key in store.list(""))
    print(
        f"deleted {len(deleted)} checkpoint(s) ({_mb(sum(i.nbytes for i in deleted))}), "
        f"swept {len(swept)} abandoned staging prefix(es)"
    )
    print(
        f"kept {len(kept)} checkpoint(s) ({_mb(sum(i.nbytes for i in kept))}): steps "
        + (", ".join(str(i.step) for i in kept) or "-")
    )
    quarantined = store.list_dirs("quarantine")
    if quarantined:
        print(f"quarantined (corrupt, kept for inspection): {', '.join(quarantined)}")
    print(f"job storage in use: {_mb(total)} at {store.url}")
    if live:
        note("colabjob: a runner is live; staging prefixes newer than its last commit were kept")
    if store.url.startswith(("/content/drive", "drive://")):
        note("colabjob: Drive keeps deleted files in its trash (they count against quota)")
    return ExitCode.DONE
