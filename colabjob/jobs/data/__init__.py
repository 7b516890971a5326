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
content is not part of their state. Wrap the unshuffled stream in ``ShuffledStream`` instead:
its checkpoint holds each worker's buffer, so a resume is exact and costs O(buffer size).

Randomness inside ``__getitem__`` or a collate function running in a worker process is *not*
restored mid-epoch (a resumed worker starts from its epoch seed, not from where the old
worker stood). Draw it from ``sample_rng(seed, epoch, index)`` instead: ``make_loader``
calls ``dataset.set_epoch(epoch)`` before each epoch when the dataset has that method.

Where each part lives (this module re-exports them all): ``colabjob.jobs.data.loader`` holds
``ResumableSampler``, ``ResumableLoader``, ``make_loader`` and ``sample_rng``;
``colabjob.jobs.data.iterable`` holds ``ResumableIterable``; ``colabjob.jobs.data.shuffle`` holds
``ShuffledStream`` and ``ShardedStream``; ``colabjob.jobs.data.geometry`` holds ``Geometry`` and
``check_geometry``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from colabjob.jobs.data.geometry import Geometry, check_geometry
    from colabjob.jobs.data.iterable import ResumableIterable
    from colabjob.jobs.data.loader import (
        ResumableLoader,
        ResumableSampler,
        make_loader,
        sample_rng,
    )
    from colabjob.jobs.data.shuffle import ShardedStream, ShuffledStream

# Lazy, so that importing ``colabjob.jobs.data.geometry`` (torch-free) does not pull in the
# loaders; each name resolves to its owning module on first use.
_OWNERS = {
    "Geometry": "colabjob.jobs.data.geometry",
    "check_geometry": "colabjob.jobs.data.geometry",
    "ResumableIterable": "colabjob.jobs.data.iterable",
    "ResumableLoader": "colabjob.jobs.data.loader",
    "ResumableSampler": "colabjob.jobs.data.loader",
    "make_loader": "colabjob.jobs.data.loader",
    "sample_rng": "colabjob.jobs.data.loader",
    "ShardedStream": "colabjob.jobs.data.shuffle",
    "ShuffledStream": "colabjob.jobs.data.shuffle",
}

__all__ = [
    "Geometry",
    "ResumableIterable",
    "ResumableLoader",
    "ResumableSampler",
    "ShardedStream",
    "ShuffledStream",
    "check_geometry",
    "make_loader",
    "sample_rng",
]


def __getattr__(name: str) -> Any:
    if name not in _OWNERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_OWNERS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
