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
session, 1 when it failed, 2 on a usage, config or lease error.
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
from colabjob.errors import ColabJobError, ConfigError, ExitCode
from colabjob.runner.slurm import add_requeue_flags
from colabjob.runner.topology import add_node_flags, topology_from_args

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.runner.supervisor import RunRequest, SupervisorResult
    from colabjob.runner.topology import NodeTopology
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
    _add_nproc(p)
    add_requeue_flags(p)
    _add_notify(p)
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
    _add_resume_choice(p)
    add_session_flags(p)
    _add_nproc(p)
    add_requeue_flags(p)
    _add_notify(p)
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
def _add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        default="1",
        metavar="N",
        help="training processes on this machine (torch.distributed DDP; 'auto': one per "
        "GPU), every kind; training.batch_size is per process. Resuming on the same N is "
        "exact; on another N it keeps the global sample order when batch_size * grad_accum "
        "* N stays the same (needs --allow-geometry-change; numbers then differ in floating "
        "point)",
    )
    p.add_argument(
        "--fsdp",
        action="append_const",
        dest="overrides",
        const="training.fsdp=true",
        help="shard weights and optimizer state over the processes (FSDP2; kind python: "
        "its function calls colabjob.jobs.sharding.shard_model); same as --set "
        "training.fsdp=true. A whole checkpoint resumes sharded and the other way round",
    )
    add_node_flags(p)


def _note_fsdp(fsdp: bool, processes: int) -> None:
    """``training.fsdp`` with one process: nothing to shard over (said, not refused, so a
    sharded job can resume on one process)."""
    if fsdp and processes < 2:
        note(
            "colabjob: training.fsdp with one process: the model stays whole (a sharded "
            "checkpoint loads into it); shard over several with --nproc N"
        )


def _add_notify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--notify",
        action="append",
        default=[],
        metavar="URL",
        help="an apprise URL told when the job pauses, completes or fails (repeatable; with "
        "the spec's notify: and COLABJOB_NOTIFY; needs colabjob[notify]). Not saved with the "
        "job: its token stays out of job.json",
    )


def _notify(args: argparse.Namespace, spec_urls: tuple[str, ...] = ()) -> None:
    """Check the notification URLs (exit 2 without apprise) and hand them to the training
    process through ``COLABJOB_NOTIFY`` (never a file: they hold tokens)."""
    import os

    from colabjob.runner.notify import ENV_VAR, notify_urls, redact, require_notify

    urls = notify_urls(spec_urls, args.notify)
    require_notify(urls)
    if urls:
        os.environ[ENV_VAR] = "\n".join(urls)
        note(f"colabjob: notifications to {', '.join(redact(u) for u in urls)}")


def _nproc(value: str, url: str) -> int:
    """``--nproc``: a count, or ``auto`` (the GPUs torch sees, at least 1)."""
    if value == "auto":
        import torch

        n = max(1, torch.cuda.device_count())
    else:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"--nproc must be a positive number or 'auto', got {value!r}")
    if n > 1 and url.startswith("memory://"):
        raise ConfigError("--nproc needs storage every process can reach, not memory://")
    from colabjob.runner.launch import check_nproc

    check_nproc(n)  # before the job's storage is written or any process starts
    return n


def _topology(args: argparse.Namespace, url: str) -> NodeTopology:
    """This machine's place among the nodes: the flags over torchrun/SLURM/SkyPilot."""
    topo = topology_from_args(args)
    if topo.multi_node and url.startswith("memory://"):
        raise ConfigError("--nnodes needs storage every machine can reach, not memory://")
    if topo.multi_node:
        role = "holds the lease and commits" if topo.node_rank == 0 else "follows node 0"
        note(
            f"colabjob: node {topo.node_rank} of {topo.nnodes} ({topo.source}); master "
            f"{topo.master_addr}:{topo.master_port}; this node {role}"
        )
    return topo


def _add_resume_choice(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which checkpoint (default: the newest valid one)")
    x = g.add_mutually_exclusive_group()
    x.add_argument(
        "--from-step",
        type=int,
        metavar="N",
        help="resume from the checkpoint of step N; newer checkpoints are set aside "
        "(quarantined, files kept), so later resumes continue from this line",
    )
    x.add_argument(
        "--checkpoint",
        metavar="ID",
        help="resume from the checkpoint ID (its directory under ckpt/, or its uid); "
        "newer ones are set aside as with --from-step",
    )
    x.add_argument(
        "--from-scratch",
        action="store_true",
        help="start over at step 0 on purpose (every checkpoint is set aside, not deleted)",
    )


def _resume_choice(args: argparse.Namespace, store: Store) -> None:
    """A checkpoint chosen by hand must exist: exit 2 listing the available ones."""
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.selection import ResumeChoice, find_checkpoint

    choice = ResumeChoice(step=args.from_step, checkpoint=args.checkpoint)
    if choice.explicit:
        info = find_checkpoint(CheckpointStore(store), choice)
        note(
            f"colabjob: resuming from checkpoint step {info.step} ({info.dirname}); newer "
            "checkpoints will be set aside (quarantined, files kept)"
        )


def _request(
    args: argparse.Namespace,
    url: str,
    spec: dict[str, Any],
    *,
    nproc: int,
    topo: NodeTopology,
    force: bool = False,
) -> RunRequest:
    from colabjob.runner.supervisor import RunRequest

    return RunRequest(
        nnodes=topo.nnodes,
        node_rank=topo.node_rank,
        master_addr=topo.master_addr,
        master_port=topo.master_port,
        url=url,
        spec=spec,
        budget=args.budget,
        platform=args.platform,
        session_started_at=args.session_started_at,
        margin=args.margin,
        allow_geometry_change=args.allow_geometry_change,
        progress=args.progress,
        debug=bool(getattr(args, "debug", False)),
        force=force,
        nproc=nproc,
        from_step=getattr(args, "from_step", None),
        from_checkpoint=getattr(args, "checkpoint", None),
        from_scratch=bool(getattr(args, "from_scratch", False)),
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
    _check_budget(args, spec)
    _notify(args, spec.notify)
    url = args.storage or spec.job.storage
    if url is None:
        url = default_job_url(spec.job.name)
        note(f"colabjob: job.storage not set; the job lives at {url}")
    nproc = _nproc(str(args.nproc), url)
    topo = _topology(args, url)
    _note_fsdp(spec.training.fsdp, nproc * topo.nnodes)
    if topo.node_rank > 0:  # node 0 creates the job and holds its lease; this node follows
        preflight(spec)
        url = open_store(url).url
        return run_request(_request(args, url, spec.to_dict(), nproc=nproc, topo=topo), args)
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
    request = _request(args, store.url, spec.to_dict(), nproc=nproc, topo=topo)
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
    _notify(args)
    store, record = open_job(args.job)
    check_not_moved(store, record)
    nproc = _nproc(str(args.nproc), store.url)  # before the lease is watched or the spec saved
    topo = _topology(args, store.url)
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
    _check_budget(args, new)
    if not follower:
        for line in changes:
            note(f"colabjob: changed {line}")
        _resume_choice(args, store)
    if changes and not follower:  # the snapshot is what the next plain `resume` runs
        _save_snapshot(store, new.to_dict())
    request = _request(args, store.url, new.to_dict(), nproc=nproc, topo=topo, force=args.force)
    return run_request(request, args)


def _check_budget(args: argparse.Namespace, spec: JobSpec) -> None:
    """Refuse a budget that leaves nothing to train (exit 2) before anything is written."""
    from colabjob.runner.budget import check_budget_fits
    from colabjob.runner.platforms import parse_budget

    budget = args.budget if args.budget is not None else spec.budget.limit
    margin = args.margin if args.margin is not None else spec.budget.margin
    check_budget_fits(parse_budget(budget), margin=margin)


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


def run_request(request: RunRequest, args: argparse.Namespace) -> int:
    """Run the segment under the supervisor (in-process for memory://) and report."""
    from colabjob.runner.supervisor import ChildResult, SupervisorResult, supervise

    if request.url.startswith("memory://"):  # other processes cannot see it
        result = _in_process(request)
    else:
        result = supervise(
            request,
            retries=args.retries,
            backoff=args.retry_backoff,
            child_module="colabjob.cli.train_child",
        )
    last: ChildResult | None = result.last
    if last is not None and last.error and last.exit_code in (ExitCode.USAGE, ExitCode.FAILED):
        hint = f"\n  hint: {last.hint}" if last.hint else ""
        note(f"colabjob: error: {last.error}{hint}")
    _report(request.url, result)
    if result.exit_code == ExitCode.FAILED and request.node_rank == 0:
        _notify_failure(request.url, result)
    if isinstance(result, SupervisorResult) and not request.url.startswith("memory://"):
        from colabjob.runner.unattended import after_segment  # SLURM requeue, Kaggle chain

        after_segment(
            request.url,
            exit_code=result.exit_code,
            stop_reason=last.stop_reason if last is not None else None,
            signals=result.signals,
            node_rank=request.node_rank,
            max_requeues=getattr(args, "max_requeues", 0),
            say=note,
        )
    return result.exit_code if isinstance(result, SupervisorResult) else ExitCode.FAILED


def _notify_failure(url: str, result: SupervisorResult) -> None:
    """The job failed for good (retries spent, or a final error): tell the endpoints."""
    from colabjob.runner.notify import notify_urls
    from colabjob.runner.notify_events import notify_failure

    last = result.last
    error = (last.error if last is not None else None) or "; ".join(result.crashes[-1:])
    notify_failure(url, error or "the training process failed", notify_urls())


def _in_process(request: RunRequest) -> SupervisorResult:
    from colabjob.display import make_progress
    from colabjob.jobs.progress import close_progress
    from colabjob.runner.supervisor import (
        ChildResult,
        SupervisorResult,
        classify_error,
        exit_code_for,
        run_in_process,
    )

    progress = make_progress(request.progress)
    try:
        outcome = run_in_process(request, progress)
        result = ChildResult(
            exit_code=exit_code_for(outcome),
            stop_reason=outcome.stop_reason,
            last_step=outcome.last_step,
            checkpoint_step=outcome.checkpoint_step,
            completed=outcome.completed,
            error=outcome.error,
        )
    except Exception as e:
        result = classify_error(e)
    finally:
        close_progress(progress)
    return SupervisorResult(exit_code=result.exit_code, attempts=1, last=result)


def _report(url: str, result: SupervisorResult) -> None:
    last = result.last
    step = f" at step {last.last_step}" if last is not None and last.last_step is not None else ""
    if result.exit_code == ExitCode.DONE:
        note(f"colabjob: done{step}. Status: colabjob status {url}")
    elif result.exit_code == ExitCode.PAUSED and last is not None and last.error_type == (
        "KeyboardInterrupt"
    ):
        note(_interrupted(url, last.error or "interrupted twice"))
    elif result.exit_code == ExitCode.PAUSED:
        why = f" ({last.stop_reason})" if last is not None and last.stop_reason else ""
        note(f"colabjob: paused{step}{why}. In the next session: colabjob resume {url}")
    elif result.exit_code == ExitCode.FAILED:
        note(f"colabjob: failed{step}; fix the cause, then: colabjob resume {url}")


def _interrupted(url: str, what: str) -> str:
    """What a second Ctrl-C left: the record's state and the newest committed step."""
    from colabjob.runner.record import read_record
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.store import open_store

    try:
        store = open_store(url)
        got = read_record(store)
        info = CheckpointStore(store).latest()
    except (ColabJobError, OSError) as e:
        return f"colabjob: {what} ({e}); `colabjob status {url}` shows where the job stands"
    state = got[0].state.value.upper() if got is not None else "unknown"
    at = f"step {info.step} (its last commit)" if info is not None else "step 0 (no commit yet)"
    return f"colabjob: {what}; the job is {state} at {at}; resume with `colabjob resume {url}`"


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

