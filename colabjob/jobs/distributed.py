"""Multi-process training: the process group, the few collectives a Session needs, and the
distributed resumable data order.

Processes are started torchrun-style (``colabjob start/resume --nproc N`` through
``colabjob.runner.launch``, or ``torchrun`` itself): ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. ``init_distributed()`` joins that group
(gloo on CPU, nccl on GPUs, one GPU per local rank). A ``Session`` in an initialized group
gets a ``Coordinator``: at every optimizer-step boundary one ``all_reduce(MAX)`` of four
ints makes every rank take the same stop and checkpoint decision at the same step; a
checkpoint gathers every rank's RNGs and loader position to rank 0, which alone commits.
The collectives run on a CPU (gloo) group, so with nccl they never wait on a GPU stream.

``DistributedResumableSampler`` keeps the *global* sample order of ``ResumableSampler``
(the permutation of ``(seed, epoch)``): each optimizer step consumes the next
``batch_size * grad_accum * world_size`` samples of it and rank ``r`` reads its slice of
each micro-batch round; the position is in global samples, so a checkpoint resumes on
another world size with the same order as long as the global batch is unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import warnings
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.utils.data import IterableDataset

from colabjob.errors import ConfigError
from colabjob.jobs.data import ResumableLoader, ResumableSampler
from colabjob.jobs.decision import Vote
from colabjob.jobs.rendezvous import rendezvous

__all__ = [
    "Coordinator",
    "DistributedResumableSampler",
    "World",
    "check_loader",
    "default_backend",
    "in_process_group",
    "init_distributed",
    "make_distributed_loader",
    "shutdown_distributed",
    "unwrap_model",
]


@dataclass(frozen=True, kw_only=True)
class World:
    """This process's place among the training processes (``World()``: alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ConfigError(
                f"bad process rank {self.rank} (local {self.local_rank}) of {self.world_size}"
            )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> World:
        """From the torchrun variables (``World()`` when they are absent)."""
        env = os.environ if environ is None else environ
        try:
            rank = int(env.get("RANK", "0"))
            return cls(
                rank=rank,
                world_size=int(env.get("WORLD_SIZE", "1")),
                local_rank=int(env.get("LOCAL_RANK", str(rank))),
            )
        except ValueError as e:
            raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK are not integers: {e}") from e

    @classmethod
    def current(cls) -> World:
        """From the initialized process group, else ``World()``."""
        if not in_process_group():
            return cls()
        rank = dist.get_rank()
        return cls(
            rank=rank,
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", str(rank))),
        )


def default_backend() -> str:
    """nccl when CUDA (and nccl) is there, else gloo."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


class _Group:
    """The CPU control group, and the default group it was made for."""

    world: Any = None
    control: Any = None


def in_process_group() -> bool:
    """Whether this process is in an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(
    *,
    backend: str | None = None,
    timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> World:
    """Join the process group the launcher's environment describes; idempotent.

    Returns ``World()`` when ``WORLD_SIZE`` is 1 or unset. With nccl, the process's GPU is
    set to ``LOCAL_RANK``. ``timeout`` (seconds) bounds every collective. The ranks meet at
    ``MASTER_ADDR:MASTER_PORT`` through ``colabjob.jobs.rendezvous`` (torch's TCPStore,
    bounded by ``COLABJOB_RENDEZVOUS_TIMEOUT``): an unreachable master, a port in use or
    ranks that disagree on the world size raise ``ConfigError`` (exit 2) naming the cause.
    """
    if in_process_group():
        return World.current()
    world = World.from_env(environ)
    if not world.distributed:
        return world
    env = os.environ if environ is None else environ
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world.world_size} but {', '.join(missing)} is not set",
            hint="start the processes with `colabjob start/resume --nproc N` or torchrun",
        )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    try:
        port = int(env["MASTER_PORT"])
    except ValueError:
        raise ConfigError(f"MASTER_PORT={env['MASTER_PORT']!r} is not a port number") from None
    store = rendezvous(
        rank=world.rank,
        world_size=world.world_size,
        addr=env["MASTER_ADDR"],
        port=port,
        environ=env,
    )
    collectives = datetime.timedelta(seconds=timeout) if timeout is not None else None
    kwargs: dict[str, Any] = {} if collectives is None else {"timeout": collectives}
    dist.init_process_group(
        backend, store=store, rank=world.rank, world_size=world.world_size, **kwargs
    )
    # The store's short rendezvous timeout was for joining; later groups use the long one.
    store.set_timeout(collectives or default_pg_timeout)
    return world


def shutdown_distributed() -> None:
    """Leave the process group (and its control group), if this process is in one."""
    if in_process_group():
        # Free unreachable cycles now: one holding a DistributedDataParallel (a Session that
        # tracked it, say) otherwise lives until interpreter finalization, and gloo aborts
        # the process when its last reference goes then (about 1 exit in 15, measured).
        gc.collect()
        # Leave together: a rank that tears gloo down while a peer is still using the
        # connection makes the peer's gloo thread abort the process ("terminate called
        # without an active exception").
        with contextlib.suppress(RuntimeError):
            dist.barrier(group=_control_group())
        dist.destroy_process_group()
    _Group.world = _Group.control = None


def _control_group() -> Any:
    """A gloo group over all ranks (the default group when it runs CPU tensors on gloo)."""
    if "gloo" in str(dist.get_backend()):
        return None
    default = dist.group.WORLD
    if _Group.control is None or _Group.world is not default:
        _Group.world, _Group.control = default, dist.new_group(backend="gloo")
    return _Group.control


class Coordinator:
    """The collectives a multi-process ``Session`` makes, on a CPU group (see module)."""

    def __init__(self, world: World, group: Any = None) -> None:
        self.world, self.group = world, group

    @classmethod
    def current(cls) -> Coordinator | None:
        """One for the initialized process group; None when there is a single process."""
        world = World.current()
        return cls(world, _control_group()) if world.distributed else None

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    def agree(self, vote: Vote) -> Vote:
        """Every rank's vote folded into one (``colabjob.jobs.decision.combine``): the
        highest stop reason, and each flag set if any rank set it."""
        t = torch.tensor(vote.codes(), dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return Vote.from_codes(t.tolist())

    def main_says(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank."""
        t = torch.tensor([int(flag) if self.world.is_main else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable) in rank order on rank 0; None elsewhere."""
        out: list[Any] | None = [None] * self.world_size if self.world.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable), on every rank."""
        box = [obj if self.world.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def unwrap_model(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers, so state-dict
    keys carry no ``module.`` prefix and checkpoints load on any number of processes."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


class DistributedResumableSampler(ResumableSampler):
    """One rank's indices of the global order of ``ResumableSampler``; O(1) seek.

    The epoch's order is the permutation from ``(seed, epoch)``. Each optimizer step takes
    the next ``global_batch = batch_size * grad_accum * world_size`` samples; micro-batch
    ``m`` of the step is the round ``[m * batch_size * world_size, ...)`` of them and rank
    ``r`` reads ``batch_size`` samples at offset ``r * batch_size`` of each round. An
    epoch's last ``len % global_batch`` samples are skipped, so every rank reads the same
    number of full batches and no window straddles epochs. The state is
    ``ResumableSampler``'s, ``offset`` counting *global* samples consumed: every rank
    saves the same one, and a plain ``ResumableSampler`` state loads too.
    """

    def __init__(
        self,
        data_source: Sized,
        *,
        seed: int,
        batch_size: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        super().__init__(data_source, seed=seed, shuffle=shuffle)
        for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        World(rank=rank, world_size=world_size)  # validates
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.rank, self.world_size = rank, world_size

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def __len__(self) -> int:
        """Indices this rank reads in a whole epoch."""
        return len(self.data_source) // self.global_batch * self.grad_accum * self.batch_size

    def __iter__(self) -> Iterator[int]:
        b, gb = self.batch_size, self.global_batch
        round_size = b * self.world_size
        order = self.order(self.epoch)
        pos, mine = self.offset, self.rank * b
        while pos + gb <= len(order):
            for m in range(self.grad_accum):
                start = pos + m * round_size + mine
                chunk = order[start : start + b].tolist()
                for j, index in enumerate(chunk):
                    if j == b - 1:  # this rank's batch of the round: the round is consumed
                        self.offset = pos + (m + 1) * round_size
                    yield index
            pos += gb


def make_distributed_loader(
    dataset: Any,
    *,
    batch_size: int,
    seed: int,
    grad_accum: int = 1,
    world: World | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    **kwargs: Any,
) -> ResumableLoader:
    """This rank's resumable loader over a map-style dataset (see the module docstring).

    ``batch_size`` is per rank and per micro-batch; ``grad_accum`` must be the one given to
    ``Session.track``. ``world`` defaults to the initialized process group (a single
    process without one). Other keyword arguments go to ``StatefulDataLoader``.
    """
    if isinstance(dataset, IterableDataset):
        raise ConfigError(
            "make_distributed_loader needs a map-style dataset",
            hint="shard an IterableDataset by rank yourself and use make_loader per rank "
            "(its position is then saved per rank and resumes on the same world size only)",
        )
    for banned in ("sampler", "batch_sampler", "generator", "persistent_workers", "drop_last"):
        if banned in kwargs:
            raise ConfigError(f"make_distributed_loader sets {banned} itself; do not pass it")
    world = world or World.current()
    sampler = DistributedResumableSampler(
        dataset,
        seed=seed,
        batch_size=batch_size,
        grad_accum=grad_accum,
        rank=world.rank,
        world_size=world.world_size,
        shuffle=shuffle,
    )
    return ResumableLoader(
        dataset,
        seed=seed,
        shuffle=shuffle,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        **kwargs,
    )


def check_loader(loader: Any, *, grad_accum: int, world_size: int) -> None:
    """Refuse a distributed loader built for another geometry; warn about one that is not
    distributed (every rank would read the whole dataset)."""
    sampler = getattr(loader, "resumable_sampler", None)
    if isinstance(sampler, DistributedResumableSampler):
        if (sampler.grad_accum, sampler.world_size) != (grad_accum, world_size):
            raise ConfigError(
                f"the loader was built for grad_accum={sampler.grad_accum} on "
                f"{sampler.world_size} process(es); this run has grad_accum={grad_accum} on "
                f"{world_size}",
                hint="pass the same grad_accum to make_distributed_loader and Session.track",
            )
    elif loader is not None and world_size > 1:
        warnings.warn(
            f"{world_size} processes train, but the loader is not a distributed one: each "
            "rank reads the whole dataset (use colabjob.jobs.distributed."
            "make_distributed_loader)",
            UserWarning,
            stacklevel=3,
        )
