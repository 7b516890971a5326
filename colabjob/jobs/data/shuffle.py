"""Buffer-shuffled streams that resume exactly: ``ShuffledStream`` and the ``ShardedStream`` source.

A corpus too big to download is shuffled on the fly: a buffer of ``B`` samples is filled
from the stream and each new sample replaces a randomly drawn one, which is yielded. HF
``IterableDataset.shuffle(buffer_size=...)`` loses that buffer on a resume; here the buffer
*is* the state. ``ShuffledStream`` wraps any source that resumes its own position (an HF
``datasets.IterableDataset`` without its own shuffle, a ``ResumableIterable``, a
``ShardedStream``) and saves, per loader worker: the source's position, the buffered samples
and how many draws its counter-based RNG made. A resume reloads the ``B`` samples and
reopens the source once: O(B), never O(position). ``ShardedStream`` reads a list of shards
in a per-epoch order derived from ``(seed, epoch)``, each shard opened at a row offset, split
by shard across loader workers and ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import IterableDataset

from colabjob.errors import CheckpointError, ConfigError, ResumeError
from colabjob.jobs.state.rng import derive_seed

__all__ = ["ShardedStream", "ShuffledStream"]

T = TypeVar("T")
S = TypeVar("S")

_FORMAT = "colabjob.shuffled_stream/1"
_SHARDS_FORMAT = "colabjob.sharded_stream/1"
_MAX_BUFFER = 1 << 24  # a bound before anything is allocated (16 M samples)


def _reader(rank: int | None, world_size: int | None) -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, workers)`` of the calling process: explicit rank and
    world size win, else ``torch.distributed`` when it is initialized, else one process."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    return rank, world_size, worker, workers


def _hf_buffer_shuffled(source: Any) -> bool:
    """Whether an HF ``IterableDataset`` was ``.shuffle()``d (its buffer would be lost)."""
    node = getattr(source, "_ex_iterable", None)
    for _ in range(64):  # the chain of wrapped example iterables is short
        if node is None:
            return False
        if "BufferShuffled" in type(node).__name__:
            return True
        node = getattr(node, "ex_iterable", None)
    return False


class ShardedStream(IterableDataset[T], Generic[S, T]):
    """A list of shards read in a per-epoch order, each opened at a row offset.

    ``open_shard(shard, row)`` returns an iterable over ``shard``'s items from item ``row``
    on (a file seek, a Parquet row group plus offset, a ``datasets`` shard ``.skip``). Epoch
    ``e`` reads the shards in ``torch.randperm`` order from ``derive_seed(seed, "shards", e)``
    (``shuffle_shards=False``: list order). Reader ``r`` of ``R`` (``R`` = ranks x loader
    workers, ``r = rank * workers + worker``) reads every ``R``-th shard of that order, so
    give at least ``R`` shards or some readers get none. The rank comes from ``rank``/
    ``world_size`` or an initialized ``torch.distributed``. State (per worker): ``{epoch,
    shard, row}``: shards of this reader finished, items of the current one consumed.
    """

    def __init__(
        self,
        shards: Sequence[S],
        open_shard: Callable[[S, int], Iterable[T]],
        *,
        seed: int,
        shuffle_shards: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if len(shards) == 0:
            raise ConfigError("ShardedStream needs at least one shard")
        self.shards = list(shards)
        self.open_shard = open_shard
        self.seed, self.shuffle_shards = int(seed), shuffle_shards
        self.rank, self.world_size = rank, world_size
        self.epoch, self.shard, self.row = 0, 0, 0

    def order(self, epoch: int) -> list[int]:
        """Indices into ``shards`` in the order epoch ``epoch`` reads them (all readers)."""
        n = len(self.shards)
        if not self.shuffle_shards:
            return list(range(n))
        g = torch.Generator().manual_seed(derive_seed(self.seed, "shards", epoch))
        return torch.randperm(n, generator=g).tolist()

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.shard, self.row = int(epoch), 0, 0

    def __iter__(self) -> Iterator[T]:
        rank, world, worker, workers = _reader(self.rank, self.world_size)
        mine = self.order(self.epoch)[rank * workers + worker :: world * workers]
        while self.shard < len(mine):
            for item in self.open_shard(self.shards[mine[self.shard]], self.row):
                self.row += 1  # counted before the yield: a snapshot there includes it
                yield item
            self.shard, self.row = self.shard + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _SHARDS_FORMAT,
            "epoch": self.epoch,
            "shard": self.shard,
            "row": self.row,
            "n_shards": len(self.shards),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _SHARDS_FORMAT:
            raise CheckpointError(f"not a ShardedStream state: {str(state_dict)[:200]}")
        if int(state_dict["n_shards"]) != len(self.shards):
            raise ResumeError(
                f"the stream had {state_dict['n_shards']} shards at the checkpoint, "
                f"{len(self.shards)} now",
                hint="resume with the same list of shards; another list changes the order",
            )
        self.epoch = int(state_dict["epoch"])
        self.shard, self.row = int(state_dict["shard"]), int(state_dict["row"])


class ShuffledStream(IterableDataset[T]):
    """A buffer shuffle over a resumable stream whose checkpoint holds the buffer.

    ``source`` is an ``IterableDataset`` with ``state_dict()``/``load_state_dict()`` (an HF
    ``datasets.IterableDataset`` *without* ``.shuffle()``, a ``ResumableIterable``, a
    ``ShardedStream``); it splits itself across loader workers and ranks, and each worker
    keeps its own buffer of ``buffer_size`` samples over its share. Draws come from a
    counter-based generator keyed by ``(seed, epoch, rank, worker)``, so its state is one
    number. ``set_epoch(e)`` (called by ``make_loader``'s loader) empties the buffer and
    passes the epoch on to the source (a ``ShardedStream`` reorders its shards).

    State per worker: ``{epoch, draws, source, source_done, buffer}`` with the buffered
    samples themselves, so samples must be what a checkpoint can hold (tensors, numbers,
    strings, bytes, lists, tuples, dicts) and the checkpoint grows by about ``buffer_size``
    samples per worker (per rank). With loader workers, every batch's worker snapshot
    compares the buffer slot by slot (O(buffer_size) per batch, in the worker); only the
    replaced slots travel to the main process.
    """

    def __init__(self, source: Any, *, buffer_size: int, seed: int) -> None:
        if not 1 <= int(buffer_size) <= _MAX_BUFFER:
            raise ConfigError(
                f"buffer_size={buffer_size}: must be between 1 and {_MAX_BUFFER}",
                hint="a buffer of a few thousand samples shuffles most corpora well",
            )
        if not (hasattr(source, "state_dict") and hasattr(source, "load_state_dict")):
            raise ConfigError(
                f"{type(source).__name__} has no state_dict()/load_state_dict(): a resume "
                "could not reopen it where it stood",
                hint="wrap the source in ResumableIterable(open_at) or ShardedStream",
            )
        if _hf_buffer_shuffled(source):
            raise ConfigError(
                "the HF IterableDataset is already .shuffle()d: its buffer is not saved",
                hint="pass the stream before .shuffle(); ShuffledStream shuffles it",
            )
        self.source = source
        self.buffer_size, self.seed = int(buffer_size), int(seed)
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._buffer: list[T] = []
        self._draws = 0
        self._source_done = False
        # a loaded source position, reported as is until the source yields again (an HF
        # stream reports its initial state until its iterator has run)
        self._source_state: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._start_epoch()
        set_epoch = getattr(self.source, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[T]:
        rank, _, worker, _ = _reader(None, None)
        key = derive_seed(self.seed, "shuffle", self.epoch, rank, worker).to_bytes(8, "little")
        buffer, size = self._buffer, self.buffer_size

        def draw(n: int) -> int:
            count = self._draws.to_bytes(8, "little")
            digest = hashlib.blake2b(count, digest_size=8, key=key).digest()
            self._draws += 1
            return int.from_bytes(digest, "little") % n

        if not self._source_done:
            source: Iterator[T] = iter(self.source)
            while True:
                try:
                    item = next(source)
                except StopIteration:
                    self._source_done = True
                    break
                self._source_state = None
                if len(buffer) < size:
                    buffer.append(item)
                    continue
                i = draw(size)
                out, buffer[i] = buffer[i], item
                yield out
        while buffer:  # the source is spent: drain the buffer in random order
            i = draw(len(buffer))
            out = buffer[i]
            buffer[i] = buffer[-1]
            buffer.pop()
            yield out

    def state_dict(self) -> dict[str, Any]:
        source: dict[str, Any] | None = None
        if not self._source_done:
            loaded = self._source_state
            source = loaded if loaded is not None else self.source.state_dict()
        return {
            "format": _FORMAT,
            "seed": self.seed,
            "buffer_size": self.buffer_size,
            "epoch": self.epoch,
            "draws": self._draws,
            "source_done": self._source_done,
            "source": source,
            # one key per slot: the loader's worker snapshots send only the changed ones
            "buffer": {str(i): item for i, item in enumerate(self._buffer)},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _FORMAT:
            raise CheckpointError(f"not a ShuffledStream state: {str(state_dict)[:200]}")
        then = (int(state_dict["seed"]), int(state_dict["buffer_size"]))
        if then != (self.seed, self.buffer_size):
            raise ResumeError(
                f"the shuffle changed: checkpoint seed={then[0]} buffer_size={then[1]}, "
                f"now seed={self.seed} buffer_size={self.buffer_size}",
                hint="resume with the job's original shuffle seed and buffer size",
            )
        slots = state_dict["buffer"]
        if len(slots) > self.buffer_size:
            raise CheckpointError(f"{len(slots)} buffered samples, more than the buffer holds")
        self.epoch = int(state_dict["epoch"])
        self._start_epoch()
        self._buffer = [slots[str(i)] for i in range(len(slots))]
        self._draws = int(state_dict["draws"])
        self._source_done = bool(state_dict["source_done"])
        if not self._source_done:
            self._source_state = state_dict["source"]
            self.source.load_state_dict(state_dict["source"])
