"""Which machines train together: the node count, this node's rank and where rank 0 listens.

``node_topology(env, nnodes=..., node_rank=..., master_addr=..., master_port=...)`` returns
a ``NodeTopology``: each field from the explicit value (the CLI's ``--nnodes``,
``--node-rank``, ``--master-addr``, ``--master-port``) when given, else from the first
launcher environment found, in this order:

- torchrun (``GROUP_RANK`` and ``LOCAL_WORLD_SIZE`` set): ``WORLD_SIZE // LOCAL_WORLD_SIZE``
  nodes, node ``GROUP_RANK``, ``MASTER_ADDR``; the port is ``MASTER_PORT + 1`` because
  torchrun's agent keeps its own store on ``MASTER_PORT`` of node 0;
- SLURM (``SLURM_NNODES`` or ``SLURM_JOB_NUM_NODES``): node ``SLURM_NODEID``, the first host
  of ``SLURM_JOB_NODELIST`` (``node[01-04,07]`` -> ``node01``), ``MASTER_PORT`` if set;
- SkyPilot (``SKYPILOT_NUM_NODES``): node ``SKYPILOT_NODE_RANK``, the first line of
  ``SKYPILOT_NODE_IPS`` (the head node), ``MASTER_PORT`` if set;

else one node on 127.0.0.1. Several nodes without a port use ``DEFAULT_MASTER_PORT`` (29500,
torchrun's); one node without one gets a free port when the launcher starts. Out-of-bounds
values raise ``ConfigError`` (exit 2). No torch: the CLI calls this before anything starts.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from colabjob.errors import ConfigError

__all__ = [
    "DEFAULT_MASTER_PORT",
    "NodeTopology",
    "add_node_flags",
    "first_host",
    "node_topology",
    "topology_from_args",
]

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True, kw_only=True)
class NodeTopology:
    """Where this node stands: ``nnodes`` machines, this one ``node_rank``, rank 0 at
    ``master_addr:master_port`` (port None: one node, the launcher picks a free one)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    source: str = "default"  # what set it: flags, torchrun, slurm, skypilot, default

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be at least 1, got {self.nnodes} ({self.source})")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(
                f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} for "
                f"{self.nnodes} node(s) ({self.source})",
                hint="number the nodes 0 to nnodes-1; node 0 runs global rank 0",
            )
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise ConfigError(
                f"--master-port must be in 1..65535, got {self.master_port} ({self.source})"
            )
        if not self.master_addr:
            raise ConfigError(f"--master-addr is empty ({self.source})")

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    def global_rank(self, local_rank: int, nproc: int) -> int:
        """Rank ``local_rank`` of this node's ``nproc`` among all nodes' processes."""
        return self.node_rank * nproc + local_rank


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[01-04,07],gpu5`` -> ``node01``,
    ``a,b`` -> ``a``, ``rack[1-2]-n[3,5]`` -> ``rack1-n3``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first comma outside brackets ends the first group
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    group = nodelist[:end].strip()
    if not group or depth < 0:
        raise ConfigError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")

    def first(m: re.Match[str]) -> str:
        return m.group(1).split(",")[0].split("-")[0].strip()

    host = re.sub(r"\[([^\]]*)\]", first, group)
    if not host or "[" in host or "]" in host:
        raise ConfigError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    return host


def _int(env: Mapping[str, str], name: str, source: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise ConfigError(
            f"{name}={env.get(name)!r} is not an integer ({source} environment)"
        ) from None


def _port(env: Mapping[str, str], source: str, offset: int = 0) -> int | None:
    return _int(env, "MASTER_PORT", source) + offset if env.get("MASTER_PORT") else None


def _from_env(env: Mapping[str, str]) -> dict[str, object]:
    """The fields a launcher's environment gives (empty when there is none)."""
    if "GROUP_RANK" in env and "LOCAL_WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", "torchrun")
        local = _int(env, "LOCAL_WORLD_SIZE", "torchrun")
        return {
            "nnodes": max(1, world // max(1, local)),
            "node_rank": _int(env, "GROUP_RANK", "torchrun"),
            "master_addr": env.get("MASTER_ADDR") or "127.0.0.1",
            "master_port": _port(env, "torchrun", offset=1),
            "source": "torchrun",
        }
    nodes = "SLURM_NNODES" if "SLURM_NNODES" in env else "SLURM_JOB_NUM_NODES"
    if nodes in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        return {
            "nnodes": _int(env, nodes, "SLURM"),
            "node_rank": _int(env, "SLURM_NODEID", "SLURM") if "SLURM_NODEID" in env else 0,
            "master_addr": first_host(nodelist) if nodelist else "127.0.0.1",
            "master_port": _port(env, "SLURM"),
            "source": "slurm",
        }
    if "SKYPILOT_NUM_NODES" in env:
        ips = [line.strip() for line in env.get("SKYPILOT_NODE_IPS", "").splitlines()]
        ips = [ip for ip in ips if ip]
        return {
            "nnodes": _int(env, "SKYPILOT_NUM_NODES", "SkyPilot"),
            "node_rank": _int(env, "SKYPILOT_NODE_RANK", "SkyPilot"),
            "master_addr": ips[0] if ips else "127.0.0.1",
            "master_port": _port(env, "SkyPilot"),
            "source": "skypilot",
        }
    return {}


def node_topology(
    env: Mapping[str, str],
    *,
    nnodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> NodeTopology:
    """This node's place (see the module): explicit values over the launcher environment."""
    fields = _from_env(env)
    explicit = {
        "nnodes": nnodes,
        "node_rank": node_rank,
        "master_addr": master_addr,
        "master_port": master_port,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    if given:
        fields["source"] = "flags" if not fields else f"flags and {fields['source']}"
    fields.update(given)
    topo = NodeTopology(**fields)  # type: ignore[arg-type]
    if topo.multi_node and topo.master_port is None:
        topo = NodeTopology(**{**fields, "master_port": DEFAULT_MASTER_PORT})  # type: ignore[arg-type]
    return topo


def add_node_flags(p: argparse.ArgumentParser) -> None:
    """``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port`` (the CLI's
    ``start``/``resume`` and the launcher's ``main`` take the same four)."""
    g = p.add_argument_group(
        "several machines (default: from torchrun, SLURM or SkyPilot, else one machine)"
    )
    g.add_argument("--nnodes", type=int, metavar="M", help="machines in all, each with --nproc")
    g.add_argument(
        "--node-rank",
        type=int,
        metavar="R",
        help="this machine, 0..M-1; node 0 holds the lease and commits, the others follow",
    )
    g.add_argument("--master-addr", metavar="HOST", help="node 0's host (reachable from all)")
    g.add_argument(
        "--master-port", type=int, metavar="P", help="node 0's rendezvous port (default 29500)"
    )


def topology_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> NodeTopology:
    """``node_topology`` from the flags ``add_node_flags`` added, over ``env`` (default: this
    process's environment)."""
    return node_topology(
        os.environ if env is None else env,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )
