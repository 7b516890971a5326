"""How the training processes find each other: torch's TCPStore at the master, bounded in time.

``rendezvous(rank, world_size, addr, port)`` is what ``init_distributed`` passes to
``init_process_group(store=...)``: global rank 0 serves a ``torch.distributed.TCPStore`` on
``port`` (every interface), the others connect to ``addr:port``. Nothing here is a protocol
of ours beyond two checks on top of the store, so that a misconfigured run fails at once
with exit 2 and a message naming the cause instead of hanging in gloo or nccl:

- every rank writes its world size; rank 0 compares each with its own, and every rank
  compares rank 0's with its own (``--nnodes``/``--nproc`` that differ between nodes);
- each step is bounded by the rendezvous timeout, ``COLABJOB_RENDEZVOUS_TIMEOUT`` seconds
  (default 300; the collectives keep their own, longer timeout): a master nobody can reach,
  a rank that never joins, a port already in use on the master all raise ``ConfigError``.

Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the agent already serves the store on
``MASTER_PORT``, so rank 0 connects to it like the others, as torch's own ``env://`` does.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Mapping

import torch.distributed as dist

from colabjob.errors import ConfigError

__all__ = ["DEFAULT_RENDEZVOUS_TIMEOUT", "TIMEOUT_ENV", "rendezvous", "rendezvous_timeout"]

TIMEOUT_ENV = "COLABJOB_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 300.0
_KEY = "colabjob/rendezvous"
_HINT_TIMEOUT = f"{TIMEOUT_ENV} (seconds) sets how long every node waits for the others"


def rendezvous_timeout(env: Mapping[str, str]) -> float:
    """Seconds to wait for the master and the other ranks (``COLABJOB_RENDEZVOUS_TIMEOUT``)."""
    raw = env.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_RENDEZVOUS_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _open_store(
    rank: int, world_size: int, addr: str, port: int, timeout: float, serve: bool
) -> dist.TCPStore:
    try:
        return dist.TCPStore(
            addr,
            port,
            world_size,
            serve,
            timeout=datetime.timedelta(seconds=timeout),
            wait_for_workers=False,  # the joins are checked below, rank by rank
        )
    except RuntimeError as e:  # DistNetworkError, DistStoreError
        if serve:
            used = "EADDRINUSE" in str(e) or "in use" in str(e)
            why = "is already in use" if used else "cannot be listened on"
            raise ConfigError(
                f"the master port {port} on this node {why} (rank 0, MASTER_ADDR {addr}): "
                f"{_first_line(e)}",
                hint="choose a free --master-port (the same on every node)",
            ) from None
        raise ConfigError(
            f"rank {rank} could not reach the master at {addr}:{port} within {timeout:g}s: "
            f"{_first_line(e)}",
            hint="start node 0 too, and check --master-addr/--master-port (the same on every "
            f"node) and that the port is open between the machines; {_HINT_TIMEOUT}",
        ) from None


def _check_world(store: dist.TCPStore, rank: int, world_size: int, timeout: float) -> None:
    """Every rank agrees on the world size (see the module)."""
    mine = f"{world_size} process(es) in all"
    who = "the master (rank 0)"
    try:
        if rank == 0:
            store.set(f"{_KEY}/world", str(world_size))
            for r in range(1, world_size):
                who = f"rank {r}"
                theirs = int(store.get(f"{_KEY}/rank{r}"))
                if theirs != world_size:
                    with contextlib.suppress(RuntimeError):  # let rank r read ours first
                        store.wait([f"{_KEY}/seen{r}"], datetime.timedelta(seconds=10))
                    raise ConfigError(
                        f"mismatched world sizes: rank {r} expects {theirs} process(es) in "
                        f"all, the master (rank 0) {mine}",
                        hint="give every node the same --nnodes and --nproc",
                    )
            return
        store.set(f"{_KEY}/rank{rank}", str(world_size))
        master = int(store.get(f"{_KEY}/world"))
        store.set(f"{_KEY}/seen{rank}", "1")
    except RuntimeError as e:
        raise ConfigError(
            f"rank {rank} of {world_size}: {who} did not join the rendezvous within "
            f"{timeout:g}s ({_first_line(e)})",
            hint=f"start every node with the same --nnodes and --nproc; {_HINT_TIMEOUT}",
        ) from None
    if master != world_size:
        raise ConfigError(
            f"mismatched world sizes: the master (rank 0) expects {master} process(es) in "
            f"all, this rank ({rank}) {mine}",
            hint="give every node the same --nnodes and --nproc",
        )


def rendezvous(
    *, rank: int, world_size: int, addr: str, port: int, environ: Mapping[str, str] | None = None
) -> dist.TCPStore:
    """The checked store every rank of this run shares (see the module)."""
    env = os.environ if environ is None else environ
    timeout = rendezvous_timeout(env)
    serve = rank == 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = _open_store(rank, world_size, addr, port, timeout, serve)
    _check_world(store, rank, world_size, timeout)
    return store
