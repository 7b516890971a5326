"""The session flags of ``start`` and ``resume`` that only they take (``--nproc``/``--fsdp``
with the node flags, ``--notify``, the resume choice ``--from-step``/``--checkpoint``/
``--from-scratch``) and the checks that turn them into values before anything is written:
the process count, this machine's place among the nodes, the notification URLs, a hand-picked
checkpoint that must exist, a budget that leaves time to train.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from colabjob.cli.common import note
from colabjob.errors import ConfigError
from colabjob.runner.topology import add_node_flags, topology_from_args

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.runner.topology import NodeTopology
    from colabjob.storage.store import Store


def add_nproc(p: argparse.ArgumentParser) -> None:
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


def add_notify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--notify",
        action="append",
        default=[],
        metavar="URL",
        help="an apprise URL told when the job pauses, completes or fails (repeatable; with "
        "the spec's notify: and COLABJOB_NOTIFY; needs colabjob[notify]). Not saved with the "
        "job: its token stays out of job.json",
    )


def apply_notify(args: argparse.Namespace, spec_urls: tuple[str, ...] = ()) -> None:
    """Check the notification URLs (exit 2 without apprise) and hand them to the training
    process through ``COLABJOB_NOTIFY`` (never a file: they hold tokens)."""
    import os

    from colabjob.runner.notify import ENV_VAR, notify_urls, redact, require_notify

    urls = notify_urls(spec_urls, args.notify)
    require_notify(urls)
    if urls:
        os.environ[ENV_VAR] = "\n".join(urls)
        note(f"colabjob: notifications to {', '.join(redact(u) for u in urls)}")


def nproc_count(value: str, url: str) -> int:
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
    from colabjob.runner.ranks import check_nproc

    check_nproc(n)  # before the job's storage is written or any process starts
    return n


def node_topology(args: argparse.Namespace, url: str) -> NodeTopology:
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


def add_resume_choice(p: argparse.ArgumentParser) -> None:
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


def check_resume_choice(args: argparse.Namespace, store: Store) -> None:
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


def check_budget(args: argparse.Namespace, spec: JobSpec) -> None:
    """Refuse a budget that leaves nothing to train (exit 2) before anything is written."""
    from colabjob.runner.budget import check_budget_fits
    from colabjob.runner.platforms import parse_budget

    budget = args.budget if args.budget is not None else spec.budget.limit
    margin = args.margin if args.margin is not None else spec.budget.margin
    check_budget_fits(parse_budget(budget), margin=margin)
