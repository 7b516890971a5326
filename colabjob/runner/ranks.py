"""The ranks of one machine: how many it may run (``check_nproc``: one per visible GPU with
CUDA, else one per CPU core this process may use; each rank is a Python process with torch
loaded) and what each rank's environment holds (``rank_env``: torchrun's variables, with
``free_port`` for ``MASTER_PORT``). ``colabjob.runner.launch`` starts the ranks.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from colabjob.errors import ConfigError

__all__ = ["check_nproc", "cpu_cores", "free_port", "nproc_limit", "rank_env"]


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or SLURM's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS)
        return os.cpu_count() or 1


def nproc_limit() -> tuple[int, str]:
    """The most ranks this machine runs, and what sets it: one per visible GPU with CUDA
    (nccl gives each rank its own), else one per CPU core."""
    import torch  # only asked for more than one rank, where the ranks load it anyway

    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return gpus, f"{gpus} visible GPU{'' if gpus == 1 else 's'}"
    cores = cpu_cores()
    return cores, f"{cores} CPU core{'' if cores == 1 else 's'} (no CUDA GPU)"


def check_nproc(nproc: int) -> None:
    """Refuse (``ConfigError``, exit 2) more ranks than ``nproc_limit()`` allows; one rank
    is always allowed and needs no torch import."""
    if nproc <= 1:
        return
    limit, what = nproc_limit()
    if nproc > limit:
        raise ConfigError(
            f"--nproc {nproc} is more than this machine's {what}: use --nproc {limit} or fewer"
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rank_env(
    base: Mapping[str, str],
    *,
    rank: int,
    nproc: int,
    master_addr: str,
    master_port: int,
    nnodes: int = 1,
    node_rank: int = 0,
) -> dict[str, str]:
    """``base`` plus the torchrun variables of local rank ``rank`` of node ``node_rank``
    (global rank ``node_rank * nproc + rank`` of ``nnodes * nproc``)."""
    env = {
        **base,
        "RANK": str(node_rank * nproc + rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nnodes * nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(node_rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
    # Under torchrun, its agent's store is not ours: our rank 0 serves the rendezvous.
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    return env
