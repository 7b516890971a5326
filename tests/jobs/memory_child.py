"""``equiv_child``'s job under a host-memory reading too small for a background checkpoint.

``python -m tests.jobs.memory_child STORE --total N --free BYTES [--kill step:K]`` runs one
segment of the ``equiv_child`` job ("map" config) through ``colabjob.session`` with
``async_checkpoint`` as given ("auto" by default). ``--free`` replaces what
``colabjob.jobs.state.host_memory.available_bytes`` reads (the injected reading of available memory:
a real cgroup limit cannot be set up unprivileged here), so ``auto`` must fall back to
synchronous, streaming saves. The session's log lines go to stdout.
"""

from __future__ import annotations

import argparse
import sys

import torch

from colabjob.jobs.state import host_memory as memory

from .equiv_child import _install_kill, build, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--free", type=int, default=None, help="bytes of free host memory to report")
    p.add_argument("--async-checkpoint", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--kill", default="none")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import colabjob

    if args.free is not None:
        free = args.free
        memory.available_bytes = lambda read=None: free  # type: ignore[assignment, misc]
    hook = _install_kill(args.kill)
    objs = build("map", init_seed=0, total=args.total)
    mode = {"auto": "auto", "true": True, "false": False}[args.async_checkpoint]
    with colabjob.session(
        args.store,
        max_steps=args.total,
        every_steps=2,
        log_every_steps=100,
        log=lambda line: print(line, flush=True),
        force=True,
        lease_ttl=0.5,
        platform="local",
        staging_dir=f"{args.store}-staging",
        async_checkpoint=mode,  # type: ignore[arg-type]
    ) as s:
        objs.track(s)
        train(s, objs, on_micro_batch=hook)
    assert s.outcome is not None
    print(f"done {s.outcome.stop_reason} {s.outcome.last_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
