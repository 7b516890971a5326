"""Streaming data that resumes by reopening its source at an item offset.

An ``IterableDataset`` cannot seek through a sampler: it resumes through its own
``state_dict()``, which ``ResumableLoader`` keeps per worker. HF ``datasets.IterableDataset``
has one; ``ResumableIterable`` adds one to any source that can be opened at an item offset
(a file seek, a shard plus row, a database cursor), so a resume reopens the source once
instead of iterating and discarding what was already consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils.data import IterableDataset

__all__ = ["ResumableIterable"]

T = TypeVar("T")


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
