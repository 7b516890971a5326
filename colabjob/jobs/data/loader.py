"""Resumable map-style order and the loader: an O(1) seek to a saved sample position.

``ResumableSampler`` orders a map-style dataset: epoch ``e`` is ``torch.randperm(len(dataset))``
from a generator seeded with ``derive_seed(seed, e)``, so resuming at sample ``k`` slices
that permutation and reads no dataset item. ``ResumableLoader`` is a torchdata
``StatefulDataLoader`` around it (or around an ``IterableDataset`` that has its own
``state_dict()``) whose ``state_dict()`` reports what was *yielded* to the training loop, not
what workers prefetched, and whose worker seeds derive from ``(seed, epoch)``;
``make_loader()`` builds one and refuses datasets it could only resume by iterating and
discarding. ``sample_rng(seed, epoch, index)`` gives a sample's random transforms a stream
that a resumed worker reproduces. The position is in samples and checked against the batch
``Geometry`` elsewhere (``colabjob.jobs.data.geometry``); ``colabjob.jobs.data`` is the overview.

Loader workers leave the stop signals to the main process (``quiet_workers``, composed with
any ``worker_init_fn`` of the caller): a scheduler or a terminal that signals the whole
process group would otherwise kill them (torch's workers die on a SIGTERM that does not come
from their parent) and the main process would crash with "DataLoader worker ... is killed
by signal" instead of stopping at the next step boundary with a checkpoint. SIGINT and
SIGUSR1 are ignored; SIGTERM is blocked and taken by a thread that exits the worker only
when the SIGTERM comes from its parent (torch and ``multiprocessing`` stop workers that
way at shutdown; ignoring it would hang the main process's exit), or when that parent is
gone: a worker whose main process was SIGKILLed exits within a second, even one killed
before torch's own parent watch in the worker started (which would then watch pid 1).
"""

from __future__ import annotations

import functools
import multiprocessing
import operator
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import IterableDataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from colabjob.errors import CheckpointError, ConfigError, ResumeError
from colabjob.jobs.state.rng import derive_seed

__all__ = ["ResumableLoader", "ResumableSampler", "make_loader", "quiet_workers", "sample_rng"]

_SAMPLER_FORMAT = "colabjob.sampler/1"
_LOADER_FORMAT = "colabjob.loader/1"


_WORKER_IGNORES = ("SIGTERM", "SIGINT", "SIGUSR1")  # the main process's watchdog owns them
_PARENT_POLL_S = 1.0  # how often a worker checks that the process it serves is alive


def _parent_pid() -> int:
    """The pid of the process that started this worker, even after it died: the one
    ``multiprocessing`` recorded (``os.getppid()`` is already 1 then)."""
    parent = multiprocessing.parent_process()
    pid = parent.pid if parent is not None else None
    return int(pid) if pid is not None else os.getppid()


def _quiet_worker(user_init: Callable[[int], Any] | None, worker_id: int) -> None:
    for name in _WORKER_IGNORES[1:]:
        signum = getattr(signal, name, None)  # SIGUSR1 does not exist on Windows
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "sigtimedwait"):  # Linux; elsewhere torch's own SIGTERM handling stays
        parent = _parent_pid()
        if os.getppid() != parent:  # SIGKILLed before this worker got here: nobody to serve
            os._exit(0)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads made later too

        def parent_term_only() -> None:
            # Also the worker's own parent watch: torch's records os.getppid() only after
            # this runs, so a parent killed in between would leave the worker alive forever.
            while True:
                info = signal.sigtimedwait({signal.SIGTERM}, _PARENT_POLL_S)
                if os.getppid() != parent or (info is not None and info.si_pid == parent):
                    os._exit(0)  # what torch's worker does on its parent's SIGTERM

        threading.Thread(target=parent_term_only, name="colabjob-worker-term", daemon=True).start()
    if user_init is not None:
        user_init(worker_id)


def quiet_workers(user_init: Callable[[int], Any] | None = None) -> Callable[[int], None]:
    """A ``worker_init_fn`` that makes a loader worker ignore the stop signals, then calls
    ``user_init`` (picklable when ``user_init`` is, for spawn/forkserver; idempotent)."""
    if isinstance(user_init, functools.partial) and user_init.func is _quiet_worker:
        return user_init
    return functools.partial(_quiet_worker, user_init)


def sample_rng(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator for the random transforms of one sample in one epoch.

    Same arguments, same stream: in any worker, before or after a resume.
    """
    return torch.Generator().manual_seed(derive_seed(seed, epoch, index))


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
        self._offset = 0
        # (iterator, position after its last item) while __iter__'s iterator is live
        self._live: tuple[Iterator[int], int] | None = None

    @property
    def offset(self) -> int:
        """Samples of the epoch consumed: yielded by the live iterator, if any."""
        live = self._live
        if live is None:
            return self._offset
        it, end = live
        return end - operator.length_hint(it)

    @offset.setter
    def offset(self, value: int) -> None:
        self._offset, self._live = int(value), None

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
        # A plain list iterator (C speed: the loader pulls one index at a time) whose
        # remaining length tells the position; no per-index Python code.
        start = self.offset
        rest = self.order(self.epoch)[start:].tolist()
        it = iter(rest)
        self._offset, self._live = start, (it, start + len(rest))
        return it

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _SAMPLER_FORMAT,
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
            "size": len(self.data_source),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _SAMPLER_FORMAT:
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
        if obj.get("format") == _SAMPLER_FORMAT:
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
        kwargs["worker_init_fn"] = quiet_workers(kwargs.get("worker_init_fn"))
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
            "format": _LOADER_FORMAT,
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
        if state_dict.get("format") != _LOADER_FORMAT:
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
