"""Resumable data order: samplers and loaders that seek to a saved position in O(1).

A position is *samples consumed in the current epoch*, never batches, together with the
batch ``Geometry`` that produced it. Map-style datasets get a ``ResumableSampler``: the
order of epoch ``e`` is ``torch.randperm(len(dataset))`` from a generator seeded with
``derive_seed(seed, e)``, so resuming at sample ``k`` slices that permutation and reads no
dataset item. ``make_loader()`` wraps it (or an ``IterableDataset``) in a ``ResumableLoader``,
a torchdata ``StatefulDataLoader`` whose ``state_dict()`` reports what was *yielded* to the
training loop, not what workers prefetched, and whose worker seeds derive from
``(seed, epoch)``. Iterable datasets resume through their own ``state_dict()`` (HF
``datasets.IterableDataset`` has one; so does ``ResumableIterable``, which reopens a source
at an offset); nothing is ever resumed by iterating and discarding.

HF streams shuffled with ``.shuffle(buffer_size=...)`` do not resume exactly: the buffer's
content is not part of their state. Shuffle such data before streaming, or go map-style.

Randomness inside ``__getitem__`` or a collate function running in a worker process is *not*
restored mid-epoch (a resumed worker starts from its epoch seed, not from where the old
worker stood). Draw it from ``sample_rng(seed, epoch, index)`` instead: ``make_loader``
calls ``dataset.set_epoch(epoch)`` before each epoch when the dataset has that method.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import torch
from torch.utils.data import IterableDataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from colabjob.errors import CheckpointError, ConfigError, GeometryChangedError, ResumeError
from colabjob.jobs.rng import derive_seed

__all__ = [
    "Geometry",
    "ResumableIterable",
    "ResumableLoader",
    "ResumableSampler",
    "check_geometry",
    "make_loader",
    "sample_rng",
]

T = TypeVar("T")
SAMPLER_FORMAT = "colabjob.sampler/1"
LOADER_FORMAT = "colabjob.loader/1"
ALLOW_FLAG = "--allow-geometry-change"


def sample_rng(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator for the random transforms of one sample in one epoch.

    Same arguments, same stream: in any worker, before or after a resume.
    """
    return torch.Generator().manual_seed(derive_seed(seed, epoch, index))


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """The batch shape a data position was produced with.

    ``batch_size`` is the per-rank micro-batch; one optimizer step consumes
    ``samples_per_step = batch_size * grad_accum * world_size`` samples.
    """

    batch_size: int
    grad_accum: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Geometry.{f.name} must be a positive int, got {value!r}")

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(**{f.name: int(data[f.name]) for f in fields(cls) if f.name in data})


def check_geometry(saved: Geometry, current: Geometry, *, allow_change: bool) -> tuple[str, ...]:
    """Compare the checkpoint's geometry with this run's; return the changed field names.

    A change is refused with ``GeometryChangedError`` unless ``allow_change``. When allowed
    the data position (in samples) stays valid: the run continues with the next unseen
    sample, but a step now consumes a different number of samples, so the step-based LR
    schedule and step counts no longer line up with samples as in the original plan. A
    ``world_size`` change that keeps ``samples_per_step`` (a resume on another number of
    processes with the per-rank batch adapted) continues the exact global sample order; it
    still needs ``allow_change``, because the numbers then differ in floating point.
    """
    changed = tuple(
        f.name for f in fields(Geometry) if getattr(saved, f.name) != getattr(current, f.name)
    )
    if not changed:
        return ()
    detail = ", ".join(f"{n} {getattr(saved, n)} -> {getattr(current, n)}" for n in changed)
    same_step = saved.samples_per_step == current.samples_per_step
    if not allow_change:
        hint = (
            f"restore the original values, or pass {ALLOW_FLAG} to continue from the same "
            "sample position with the new geometry (the result is then not bit-identical)"
        )
        per_rank, rest = divmod(saved.samples_per_step, current.world_size)
        if "world_size" in changed and same_step:
            hint = (
                f"the global batch is unchanged, so the sample order continues exactly; pass "
                f"{ALLOW_FLAG} to accept that another process count changes the numbers in "
                "floating point (the gradient reduction order), so the result is not "
                "bit-identical"
            )
        elif "world_size" in changed and not rest:
            hint = (
                f"to keep the sample order on {current.world_size} process(es), choose "
                f"batch_size * grad_accum = {per_rank} ({saved.samples_per_step} samples per "
                f"step) and pass {ALLOW_FLAG}; or {hint}"
            )
        raise GeometryChangedError(
            f"batch geometry changed since the checkpoint: {detail} "
            f"(samples per optimizer step {saved.samples_per_step} -> {current.samples_per_step})",
            hint=hint,
        )
    effect = (
        "the global sample order continues exactly; numbers differ in floating point only"
        if same_step
        else "the sample order continues, but a step now consumes "
        f"{current.samples_per_step} samples instead of {saved.samples_per_step}"
    )
    warnings.warn(
        f"continuing with a changed batch geometry: {detail} ({effect})", UserWarning, stacklevel=2
    )
    return changed


class ResumableSampler(Sampler[int]):
    """Indices of a map-style dataset, one seeded permutation per epoch, O(1) seek.

    Iterating yields the rest of the current epoch from the current offset. Call
    ``set_epoch(e)`` before each epoch (as with ``DistributedSampler``); ``ResumableLoader``
    does it for you. State: ``{seed, epoch, offset, size, shuffle}``, offset in samples.
    """

    def __init__(self, data_source: Sized, *, seed: int, shuffle: bool = True) -> None:
        self.data_source = data_source
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0

    def __len__(self) -> int:
        return len(self.data_source)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``'s start; keeps the offset when it is the current epoch."""
        if epoch != self.epoch:
            self.epoch, self.offset = int(epoch), 0

    def order(self, epoch: int) -> torch.Tensor:
        """The full index order of ``epoch`` (int64 tensor)."""
        n = len(self.data_source)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(
            n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        )

    def __iter__(self) -> Iterator[int]:
        start = self.offset
        for i, index in enumerate(self.order(self.epoch)[start:].tolist(), start=start):
            self.offset = i + 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": SAMPLER_FORMAT,
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
            "size": len(self.data_source),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != SAMPLER_FORMAT:
            raise CheckpointError(f"not a ResumableSampler state: {state_dict!r:.200}")
        size = len(self.data_source)
        if int(state_dict["size"]) != size:
            raise ResumeError(
                f"the dataset had {state_dict['size']} samples at the checkpoint, {size} now",
                hint="resume with the same dataset; a changed dataset changes the sample order",
            )
        if int(state_dict["seed"]) != self.seed or bool(state_dict["shuffle"]) != self.shuffle:
            raise ResumeError(
                f"sampler seed/shuffle changed: checkpoint seed={state_dict['seed']} "
                f"shuffle={state_dict['shuffle']}, now seed={self.seed} shuffle={self.shuffle}",
                hint="resume with the job's original data seed",
            )
        self.epoch, self.offset = int(state_dict["epoch"]), int(state_dict["offset"])


def _find_sampler_state(obj: Any) -> dict[str, Any] | None:
    """The ResumableSampler state nested anywhere in a torchdata loader state."""
    if isinstance(obj, dict):
        if obj.get("format") == SAMPLER_FORMAT:
            return obj
        children: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    else:
        return None
    for child in children:
        found = _find_sampler_state(child)
        if found is not None:
            return found
    return None


class ResumableLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` with epochs, deterministic worker seeds and a portable state.

    Build it with ``make_loader()`` (or ``colabjob.jobs.distributed.make_distributed_loader``,
    which passes a ``DistributedResumableSampler`` as ``sampler``; its workers' seeds also
    mix in the rank). Each ``iter()`` continues where the last yielded batch
    left off; once an epoch is exhausted the next ``iter()`` starts the next one. Before an
    epoch's iterator starts, the loader's generator (hence every worker's ``torch``,
    ``random`` and ``numpy`` seed) is reseeded from ``(seed, epoch)`` and
    ``dataset.set_epoch(epoch)`` is called if the dataset has it. ``persistent_workers`` is
    always off, so workers see the epoch.

    ``state_dict()`` is JSON-able for map-style data (the sampler position at the last
    yielded batch); it holds the dataset's own state for iterable data. A map-style state
    loads into a loader with another batch size or worker count (the position is in
    samples); an iterable state needs the same ``num_workers`` (it is kept per worker).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int,
        shuffle: bool,
        sampler: ResumableSampler | None = None,
        **kwargs: Any,
    ) -> None:
        self.is_iterable = isinstance(dataset, IterableDataset)
        if sampler is None and not self.is_iterable:
            sampler = ResumableSampler(dataset, seed=seed, shuffle=shuffle)
        with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital
            warnings.filterwarnings("ignore", message=".*set_vital", category=UserWarning)
            super().__init__(
                dataset,
                sampler=sampler,
                generator=torch.Generator(),
                persistent_workers=False,
                snapshot_every_n_steps=1,
                **kwargs,
            )
        self.seed = int(seed)
        self.resumable_sampler = sampler
        self._iter_epoch = 0

    @property
    def epoch(self) -> int:
        """The epoch the current (or next) iteration covers."""
        sampler = self.resumable_sampler
        return sampler.epoch if sampler is not None else self._iter_epoch

    def _set_epoch(self, epoch: int) -> None:
        if self.resumable_sampler is not None:
            self.resumable_sampler.set_epoch(epoch)
        self._iter_epoch = epoch

    def _get_iterator(self) -> Any:
        prev = self._iterator
        if prev is not None and getattr(prev, "_finished", False):
            self._set_epoch(self.epoch + 1)
        elif prev is not None:  # iterated again mid-epoch: continue after the last yielded
            self._resume_from(prev.state_dict())
        epoch = self.epoch
        rank = getattr(self.resumable_sampler, "rank", 0)  # ranks' workers draw apart
        labels = ("workers",) if not rank else ("workers", rank)
        self.generator.manual_seed(derive_seed(self.seed, epoch, *labels))
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        return super()._get_iterator()

    def _resume_from(self, inner: dict[str, Any]) -> None:
        if self.resumable_sampler is not None:
            position = _find_sampler_state(inner)
            if position is None:
                raise CheckpointError(
                    "no ResumableSampler position in the StatefulDataLoader state"
                )
            self.resumable_sampler.load_state_dict(position)
        else:
            self.next_iter_state = inner

    def state_dict(self) -> dict[str, Any]:
        it = self._iterator
        finished = it is not None and bool(getattr(it, "_finished", False))
        state: dict[str, Any] = {
            "format": LOADER_FORMAT,
            "kind": "iterable" if self.is_iterable else "map",
            "epoch": self.epoch + 1 if finished else self.epoch,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
        }
        if self.resumable_sampler is not None:
            if it is None:
                position = self.resumable_sampler.state_dict()
            elif finished:
                position = {
                    **self.resumable_sampler.state_dict(),
                    "epoch": state["epoch"],
                    "offset": 0,
                }
            else:
                found = _find_sampler_state(super().state_dict())
                if found is None:
                    raise CheckpointError("no ResumableSampler position in the torchdata state")
                position = found
            state["sampler"] = dict(position)
        else:
            state["epoch"] = self.epoch  # torchdata records "finished"; its load advances
            state["loader"] = (
                super().state_dict() if it is not None else (self.next_iter_state or {})
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != LOADER_FORMAT:
            raise CheckpointError(f"not a ResumableLoader state: {str(state_dict)[:200]}")
        kind = "iterable" if self.is_iterable else "map"
        if state_dict["kind"] != kind:
            raise ResumeError(
                f"checkpoint holds a {state_dict['kind']} dataset position, this is {kind}"
            )
        super().load_state_dict({})
        if self.resumable_sampler is not None:
            self.resumable_sampler.load_state_dict(state_dict["sampler"])
            return
        if state_dict["loader"] and int(state_dict["num_workers"]) != self.num_workers:
            raise ResumeError(
                f"a streaming dataset's position is kept per worker: the checkpoint used "
                f"num_workers={state_dict['num_workers']}, this run {self.num_workers}",
                hint=f"resume with num_workers={state_dict['num_workers']}",
            )
        self._iter_epoch = int(state_dict["epoch"])
        super().load_state_dict(state_dict["loader"])


def make_loader(
    dataset: Any,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    **kwargs: Any,
) -> ResumableLoader:
    """A resumable loader over a map-style or iterable dataset.

    ``shuffle`` defaults to True for map-style data; an ``IterableDataset`` is read in its own
    order (shuffle it deterministically inside the dataset), so ``shuffle=True`` is refused
    for one. Extra keyword arguments (``pin_memory``, ``prefetch_factor``, ``timeout``,
    ``worker_init_fn``, ``multiprocessing_context``) go to ``StatefulDataLoader``.
    """
    for banned in ("sampler", "batch_sampler", "generator", "persistent_workers"):
        if banned in kwargs:
            raise ConfigError(f"make_loader sets {banned} itself; do not pass it")
    if isinstance(dataset, IterableDataset):
        if not (hasattr(dataset, "state_dict") and hasattr(dataset, "load_state_dict")):
            raise ConfigError(
                f"{type(dataset).__name__} has no state_dict()/load_state_dict(): resuming it "
                "would mean re-reading and discarding everything already consumed",
                hint="wrap the source in ResumableIterable(open_at) or use a map-style dataset",
            )
        if shuffle:
            raise ConfigError(
                "shuffle=True is not supported for an IterableDataset",
                hint="shuffle inside the dataset with a fixed seed, or use a map-style dataset",
            )
        shuffle = False
    return ResumableLoader(
        dataset,
        seed=seed,
        shuffle=True if shuffle is None else shuffle,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn,
        **kwargs,
    )


class ResumableIterable(IterableDataset[T]):
    """An iterable dataset over a source that can be opened at an item offset.

    ``open_at(offset)`` returns an iterable starting at item ``offset`` of the stream (a file
    seek, a shard plus row, a database cursor); resuming calls it once with the saved
    offset. With ``num_workers=W`` worker ``w`` reads items ``w, w+W, ...``: it opens at its
    next own item and skips the ``W-1`` items between, so prefer ``W`` small. State:
    ``{epoch, position}``, ``position`` counting this copy's yielded items.
    """

    def __init__(self, open_at: Callable[[int], Iterable[T]]) -> None:
        self.open_at = open_at
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[T]:
        info = torch.utils.data.get_worker_info()
        rank, stride = (info.id, info.num_workers) if info is not None else (0, 1)
        source = iter(self.open_at(rank + self.position * stride))
        while True:
            try:
                item = next(source)
            except StopIteration:
                return
            self.position += 1
            yield item
            for _ in range(stride - 1):  # the other workers' items
                if next(source, _END) is _END:
                    return

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch, self.position = int(state_dict["epoch"]), int(state_dict["position"])


_END = object()
