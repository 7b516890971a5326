"""Pinned host buffers for background snapshots of GPU state, allocated once per run.

A background checkpoint copies the model and optimizer tensors to host memory before the loop
goes on. From a GPU, a copy into freshly allocated pageable memory is slow (the driver bounces
it through a pinned buffer of its own) and allocates a whole state's worth of host RAM at
every checkpoint. A ``StagingPool`` keeps one page-locked CPU buffer per tensor (keyed by the
tensor's name, holding its shape and dtype) and hands the same buffers to every later
snapshot: the copies are issued with ``non_blocking=True`` and the source devices' current
streams synchronized once, after the last one (``Staging.finish``), before the loop may change
the weights again. A changed shape or dtype gets a new buffer; a name no longer snapshotted
drops its buffer.

One snapshot may use the buffers at a time: ``lease()`` answers None while an earlier
snapshot's write may still read them (the caller then copies into plain memory, as without a
pool); ``Staging.release()`` (called by ``write_snapshot`` when it is done, or when the
snapshot is garbage collected) frees them for the next one. ``clear()`` drops every buffer:
the pool costs one copy of the state in host RAM for the run, which a run saving
synchronously (too little host memory) must not keep. CPU tensors never come here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

__all__ = ["Allocator", "Staging", "StagingPool", "pinned_empty"]

Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A page-locked CPU tensor (needs CUDA: ``pin_memory=True`` raises on a CPU-only build)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _sync_stream(device: torch.device) -> None:
    torch.cuda.current_stream(device).synchronize()


class StagingPool:
    """Reusable host buffers for snapshots of device tensors; see the module docstring."""

    def __init__(
        self,
        allocate: Allocator = pinned_empty,
        synchronize: Callable[[torch.device], None] = _sync_stream,
    ) -> None:
        self._allocate, self._synchronize = allocate, synchronize
        self._buffers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self._leased: int | None = None  # the generation whose snapshot holds the buffers

    @property
    def nbytes(self) -> int:
        """Host memory the buffers hold (it counts as free for the next snapshot's copy)."""
        with self._lock:
            return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @property
    def in_use(self) -> bool:
        with self._lock:
            return self._leased is not None

    def lease(self) -> Staging | None:
        """The buffers for one snapshot, or None while an earlier one may still read them."""
        with self._lock:
            if self._leased is not None:
                return None
            self._generation += 1
            self._leased = self._generation
            return Staging(self, self._generation)

    def clear(self) -> int:
        """Drop every buffer (a snapshot still holding some keeps those alive until written);
        returns the bytes they held."""
        with self._lock:
            freed = sum(b.numel() * b.element_size() for b in self._buffers.values())
            self._buffers.clear()
            return freed

    def _buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
                buf = self._allocate(shape, dtype)
                self._buffers[key] = buf
            return buf

    def _prune(self, keep: set[str]) -> None:
        with self._lock:
            for key in [k for k in self._buffers if k not in keep]:
                del self._buffers[key]

    def _release(self, generation: int) -> None:
        with self._lock:
            if self._leased == generation:
                self._leased = None


class Staging:
    """One snapshot's use of a ``StagingPool``: ``copy`` each device tensor, ``finish`` once
    (waits for the copies), ``release`` when the snapshot is written."""

    def __init__(self, pool: StagingPool, generation: int) -> None:
        self._pool, self._generation = pool, generation
        self._keys: set[str] = set()
        self._devices: set[torch.device] = set()

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (on a GPU) copied into the pool's buffer for ``key``, asynchronously:
        the buffer is only valid after ``finish()``."""
        if key in self._keys:
            raise ValueError(f"staging key {key!r} used twice in one snapshot")
        self._keys.add(key)
        self._devices.add(tensor.device)
        buf = self._pool._buffer(key, tuple(tensor.shape), tensor.dtype)
        buf.copy_(tensor.detach(), non_blocking=True)
        return buf

    def finish(self) -> None:
        """Wait for every copy issued (once per device); drop buffers of names not copied."""
        for device in self._devices:
            self._pool._synchronize(device)
        self._pool._prune(self._keys)

    def release(self) -> None:
        """The snapshot no longer reads the buffers: the next one may reuse them (idempotent;
        a stale release after ``clear()`` and a newer lease changes nothing)."""
        self._pool._release(self._generation)
