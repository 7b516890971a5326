"""Commands that create and run jobs: ``init``, ``start``, ``resume``, ``demo`` (and ``handoff``,
whose parser lives in ``handoff.py``).

``start`` validates the spec, the local paths it names and what the job kind would load
(``jobs.kinds.preflight``: data and its text field, a local model's config, LoRA targets on
a meta-device skeleton, a python entrypoint) before the job's storage is even opened, then
runs the first segment under the supervisor (a child process, retried from the last
checkpoint if it crashes). ``resume`` needs only the job URL: the spec comes from the job
record; ``--set`` may change what does not break an exact resume (``diff_for_resume``),
anything else only with ``--force-config``. ``--nproc N`` (a session flag, not saved with
the job) runs the job as N torch.distributed processes on this machine
(``colabjob.runner.launch``; rank 0 commits); ``--nnodes M --node-rank R --master-addr
HOST --master-port P`` (or the same from torchrun, SLURM or SkyPilot,
``colabjob.runner.topology``) makes it one of M machines: node 0 does all of the above and
holds the lease, a node R > 0 checks the spec, takes no lease, writes nothing to the job
and runs its ranks, which follow rank 0's decisions; its exit code mirrors the run. Both
exit 0 when the job completed, 75 when the segment stopped in time to resume in the next
session, 1 when it failed, 2 on a usage, config or lease error. Their own flags and the
checks on them live in ``run_flags.py``; running the request and reporting its end in
``run_segment.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.cli.common import (
    add_session_flags,
    check_session_flags,
    default_job_url,
    note,
    open_job,
)
from colabjob.cli.run_flags import (
    add_notify,
    add_nproc,
    add_resume_choice,
    apply_notify,
    check_budget,
    check_resume_choice,
    node_topology,
    nproc_count,
)
from colabjob.cli.run_segment import build_request, run_request
from colabjob.errors import ConfigError, ExitCode
from colabjob.runner.slurm import add_requeue_flags

if TYPE_CHECKING:
    from colabjob.storage.store import Store


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[common], help="write a commented job spec")
    p.add_argument("--kind", default="lora", help="finetune, lora, scratch or python")
    p.add_argument("--name", help="job name (default: my-KIND-job)")
    p.add_argument("-o", "--output", default="job.yaml", help="file to write ('-': stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("start", parents=[common], help="create a job from a spec and run it")
    p.add_argument("spec", help="the YAML job spec")
    p.add_argument("--storage", metavar="URL", help="where the job lives (overrides job.storage)")
    add_session_flags(p)
    add_nproc(p)
    add_requeue_flags(p)
    add_notify(p)
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("resume", parents=[common], help="continue a job from its last checkpoint")
    p.add_argument("job", metavar="JOB_URL")
    p.add_argument(
        "--force",
        action="store_true",
        help="take over the lease of a runner that looks dead (after confirming it expired)",
    )
    p.add_argument(
        "--force-config",
        action="store_true",
        help="accept --set changes that make the resumed run differ from an uninterrupted one",
    )
    add_resume_choice(p)
    add_session_flags(p)
    add_nproc(p)
    add_requeue_flags(p)
    add_notify(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser(
        "demo", parents=[common], help="run the embedded demo job (no download, CPU)"
    )
    p.add_argument("--dir", metavar="DIR", help="where the demo lives (default: a new temp dir)")
    p.add_argument("--size", default="default", help="default, or tiny (seconds)")
    p.add_argument("--sessions", type=int, default=3, help="simulated sessions (default 3)")
    p.add_argument(
        "--no-compare",
        action="store_true",
        help="skip the uninterrupted run that checks the weights are bit-identical",
    )
    p.add_argument(
        "--progress", choices=("auto", "rich", "plain", "none"), default="auto", help="display"
    )
    p.set_defaults(func=cmd_demo)

    from colabjob.cli.handoff import configure_parser

    configure_parser(sub, common)


# -- init ------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from colabjob.config import render_template

    text = render_template(args.kind, name=args.name)
    if args.output == "-":
        sys.stdout.write(text)
        return ExitCode.DONE
    out = Path(args.output)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists", hint="pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    note(f"wrote {out} (kind {args.kind}); edit it, then: colabjob start {out}")
    return ExitCode.DONE


# -- start / resume --------------------------------------------------------------------------
def _note_fsdp(fsdp: bool, processes: int) -> None:
    """``training.fsdp`` with one process: nothing to shard over (said, not refused, so a
    sharded job can resume on one process)."""
    if fsdp and processes < 2:
        note(
            "colabjob: training.fsdp with one process: the model stays whole (a sharded "
            "checkpoint loads into it); shard over several with --nproc N"
        )


def cmd_start(args: argparse.Namespace) -> int:
    from colabjob.config import check_local_paths, load_spec
    from colabjob.jobs.kinds import preflight  # torch/transformers: only `start` pays for it
    from colabjob.runner.handoff.transfer import check_not_moved
    from colabjob.runner.record import read_record
    from colabjob.storage.store import open_store

    check_session_flags(args)
    spec = load_spec(args.spec, args.overrides)
    check_local_paths(spec)
    check_budget(args, spec)
    apply_notify(args, spec.notify)
    url = args.storage or spec.job.storage
    if url is None:
        url = default_job_url(spec.job.name)
        note(f"colabjob: job.storage not set; the job lives at {url}")
    nproc = nproc_count(str(args.nproc), url)
    topo = node_topology(args, url)
    _note_fsdp(spec.training.fsdp, nproc * topo.nnodes)
    if topo.node_rank > 0:  # node 0 creates the job and holds its lease; this node follows
        preflight(spec)
        url = open_store(url).url
        return run_request(build_request(args, url, spec.to_dict(), nproc=nproc, topo=topo), args)
    existing = _existing_store(url)  # opens no local root that is not there yet
    got = read_record(existing) if existing is not None else None
    if existing is not None and got is not None:
        check_not_moved(existing, got[0])
        state = got[0].state.value
        _check_lease(existing, force=False, why=f"a job already exists there ({state})")
        raise ConfigError(
            f"a job already exists at {existing.url} (state {got[0].state.value})",
            hint=f"continue it with `colabjob resume {existing.url}`, or choose another --storage",
        )
    preflight(spec)  # before the job's storage is opened for writing (or created)
    store = existing if existing is not None else open_store(url)
    request = build_request(args, store.url, spec.to_dict(), nproc=nproc, topo=topo)
    return run_request(request, args)


def _existing_store(url: str) -> Store | None:
    """The store at ``url``, or None for a local path that does not exist (opening it would
    create the directory: nothing may be written before the spec passed its checks)."""
    import os

    from colabjob.storage.store import open_store

    if "://" not in url or url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(url).path) if url.startswith("file://") else url
        if not os.path.exists(os.path.expanduser(path)):
            return None
    return open_store(url)


def cmd_resume(args: argparse.Namespace) -> int:
    from colabjob.config import JobSpec, apply_overrides, diff_for_resume
    from colabjob.runner.handoff.transfer import check_not_moved
    from colabjob.runner.record import script_config
    from colabjob.runner.states import JobState

    check_session_flags(args)
    apply_notify(args)
    store, record = open_job(args.job)
    check_not_moved(store, record)
    nproc = nproc_count(str(args.nproc), store.url)  # before the lease is watched or the spec saved
    topo = node_topology(args, store.url)
    follower = topo.node_rank > 0  # node 0 checks and takes the lease, saves the spec
    if record.state is JobState.COMPLETED:
        note(f"colabjob: job {record.job_id} is already completed (step {record.last_step})")
        return ExitCode.DONE
    if record.state is JobState.CANCELLED:
        raise ConfigError(
            f"job {record.job_id} was cancelled", hint="start a new job to train again"
        )
    if not follower:
        _check_lease(store, force=args.force)
    script = script_config(record.config)
    if script is not None:
        raise ConfigError(
            f"job {record.job_id} was made by a script (colabjob.hf.resumable, "
            f"{script.get('kind')}); `colabjob resume` runs job specs only",
            hint="resume it by running that script again (same URL): it continues from the "
            "newest checkpoint",
        )
    if not isinstance(record.config.get("job"), dict):
        raise ConfigError(
            f"job {record.job_id} has no job spec in its record (it was started from Python "
            "code with colabjob.session())",
            hint="resume it by running that code again; it picks up the newest checkpoint",
        )
    old = JobSpec.from_dict(record.config)
    new = old
    if args.overrides:
        new = JobSpec.from_dict(apply_overrides(old.to_dict(), args.overrides))
    changes = diff_for_resume(old, new, force=args.force_config)
    _note_fsdp(new.training.fsdp, nproc * topo.nnodes)
    check_budget(args, new)
    if not follower:
        for line in changes:
            note(f"colabjob: changed {line}")
        check_resume_choice(args, store)
    if changes and not follower:  # the snapshot is what the next plain `resume` runs
        _save_snapshot(store, new.to_dict())
    request = build_request(
        args, store.url, new.to_dict(), nproc=nproc, topo=topo, force=args.force
    )
    return run_request(request, args)


def _save_snapshot(store: Store, config: dict[str, Any]) -> None:
    import dataclasses

    from colabjob.runner.record import update_record

    update_record(store, lambda r: dataclasses.replace(r, config=config, config_hash=""))


def _now() -> float:
    import time

    return time.time()


def _check_lease(store: Store, *, force: bool, why: str = "") -> None:
    """Refuse (exit 2, naming the holder) a job whose lease a live runner holds, unless
    ``force`` (the child then watches the lease for at most our TTL). A holder that died on
    this machine is not refused: the child takes its lease over at once."""
    from colabjob.errors import InvalidLeaseError
    from colabjob.runner.lease.claim import DEFAULT_TTL
    from colabjob.runner.lease.info import LeaseObserver, held_error
    from colabjob.runner.states import LeaseStatus

    try:
        info, status = LeaseObserver(store).poll()
    except InvalidLeaseError:
        if not force:
            raise
        note(
            f"colabjob: the job's lease file is damaged; watching it for {DEFAULT_TTL:.0f}s: "
            "it is replaced only if nothing changes it"
        )
        return
    if info is None or status not in (LeaseStatus.LIVE, LeaseStatus.STALE):
        return
    if info.holder.gone():
        note(
            f"colabjob: the runner that holds the lease (pid {info.holder.pid} on this "
            "machine) is gone; taking its lease over"
        )
        return
    if why or (status is LeaseStatus.LIVE and not force):  # `start` names any holder
        raise held_error(store, info, _now(), why=why, watch=DEFAULT_TTL)
    if status is LeaseStatus.LIVE:
        note(
            f"colabjob: watching the lease of {info.holder.describe()} for up to "
            f"{min(info.ttl, DEFAULT_TTL):.0f}s; it is taken over only if its heartbeat "
            "does not move"
        )


# -- demo / handoff --------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded demo (``colabjob.jobs.demo``): a tiny GPT-2 trained from scratch on the
    standard library's sources in simulated sessions, each a real runner segment
    (``colabjob.runner.demo_run``), then uninterrupted; exit 0 when the final weights are
    bit-identical."""
    import tempfile

    from colabjob.display import make_progress
    from colabjob.jobs.demo import DEMO_SIZES
    from colabjob.jobs.progress import close_progress
    from colabjob.runner.demo_run import run_demo

    if args.size not in DEMO_SIZES:
        raise ConfigError(
            f"unknown demo size {args.size!r}", hint=f"one of: {', '.join(DEMO_SIZES)}"
        )
    if args.sessions < 1:
        raise ConfigError(f"--sessions must be >= 1, got {args.sessions}")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="colabjob-demo-"))
    if (root / "job").exists():
        raise ConfigError(f"{root} already holds a demo job", hint="pass an empty --dir")
    note(f"colabjob demo: a tiny GPT-2 from scratch on the standard library's sources, in {root}")
    sink = make_progress(args.progress)
    try:
        report = run_demo(
            root,
            size=args.size,
            sessions=args.sessions,
            compare=not args.no_compare,
            progress=sink,
        )
    finally:
        close_progress(sink)
    if args.progress == "none":
        print("\n".join(report.lines()))
    note(f"look at it: colabjob status {root / 'job'}; colabjob plot {root / 'job'}")
    return ExitCode.FAILED if report.identical is False else ExitCode.DONE
