"""The pinned staging pool (``colabjob.jobs.state.pinned``) without a GPU: its allocator and
stream synchronization are injected (plain CPU tensors, a recorder), so reuse across
snapshots, keying by name/shape/dtype, pruning, ``clear()`` and the guard against handing out
buffers an unfinished write still reads are all checked here; ``tests/gpu`` checks real
pinned memory. Also: ``snapshot()`` leaves CPU tensors out of the pool and ``write_snapshot``
hands the lease back, and ``SaveChooser`` counts the pool as room and releases it when saving
turns synchronous (said once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from colabjob.jobs.state.capture import snapshot, write_snapshot
from colabjob.jobs.state.format import Counters
from colabjob.jobs.state.host_memory import SaveChooser
from colabjob.jobs.state.pinned import StagingPool
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.tracked import Tracked

from .helpers import IN, TinyNet

GB = 10**9


class Recorder:
    """An allocator of plain CPU tensors and a stream synchronizer that record their calls."""

    def __init__(self) -> None:
        self.allocated: list[tuple[tuple[int, ...], torch.dtype]] = []
        self.synced: list[torch.device] = []

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.allocated.append((shape, dtype))
        return torch.empty(shape, dtype=dtype)

    def synchronize(self, device: torch.device) -> None:
        self.synced.append(device)

    def pool(self) -> StagingPool:
        return StagingPool(allocate=self.allocate, synchronize=self.synchronize)


def _stage(pool: StagingPool, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    lease = pool.lease()
    assert lease is not None
    out = {k: lease.copy(k, t) for k, t in tensors.items()}
    lease.finish()
    lease.release()
    return out


def test_buffers_are_allocated_once_and_reused() -> None:
    rec = Recorder()
    pool = rec.pool()
    first = _stage(pool, {"w": torch.ones(3, 4), "b": torch.zeros(4, dtype=torch.float16)})
    assert len(rec.allocated) == 2 and rec.synced == [torch.device("cpu")]  # once, not per copy
    assert pool.nbytes == 3 * 4 * 4 + 4 * 2
    second = _stage(pool, {"w": torch.full((3, 4), 7.0), "b": torch.ones(4, dtype=torch.float16)})
    assert len(rec.allocated) == 2  # nothing new
    assert second["w"].data_ptr() == first["w"].data_ptr()
    assert second["b"].data_ptr() == first["b"].data_ptr()
    assert torch.equal(second["w"], torch.full((3, 4), 7.0))  # the new values, copied in
    assert torch.equal(second["b"], torch.ones(4, dtype=torch.float16))


def test_a_changed_shape_or_dtype_gets_a_new_buffer_and_dropped_names_free_theirs() -> None:
    rec = Recorder()
    pool = rec.pool()
    first = _stage(pool, {"w": torch.ones(3, 4), "b": torch.ones(4), "gone": torch.ones(100)})
    assert pool.nbytes == (12 + 4 + 100) * 4
    second = _stage(pool, {"w": torch.ones(4, 4), "b": torch.ones(4, dtype=torch.float64)})
    assert rec.allocated[3:] == [((4, 4), torch.float32), ((4,), torch.float64)]
    assert second["w"].data_ptr() != first["w"].data_ptr()
    assert second["b"].dtype == torch.float64
    assert pool.nbytes == 16 * 4 + 4 * 8  # "gone" was not snapshotted: its buffer is dropped
    lease = pool.lease()
    assert lease is not None
    lease.copy("w", torch.ones(4, 4))
    with pytest.raises(ValueError, match="used twice"):
        lease.copy("w", torch.ones(4, 4))


def test_buffers_still_read_by_a_write_are_not_handed_out() -> None:
    rec = Recorder()
    pool = rec.pool()
    held = pool.lease()
    assert held is not None and pool.in_use
    assert pool.lease() is None  # the caller copies into plain memory instead
    held.release()
    assert not pool.in_use
    held.release()  # idempotent
    again = pool.lease()
    assert again is not None
    held.release()  # a stale release does not free the newer lease
    assert pool.in_use and pool.lease() is None
    again.release()


def test_clear_drops_every_buffer_and_reports_the_bytes() -> None:
    rec = Recorder()
    pool = rec.pool()
    kept = _stage(pool, {"w": torch.ones(10, 10)})
    assert pool.clear() == 400 and pool.nbytes == 0
    assert torch.equal(kept["w"], torch.ones(10, 10))  # a holder still reads it
    _stage(pool, {"w": torch.ones(10, 10)})
    assert len(rec.allocated) == 2  # allocated again after the clear


def test_snapshot_keeps_cpu_tensors_out_of_the_pool_and_the_write_hands_it_back(
    tmp_path: Path,
) -> None:
    rec = Recorder()
    pool = rec.pool()
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, IN)).sum().backward()
    opt.step()
    snap = snapshot(Tracked(model=model, optimizer=opt), counters=Counters(step=1), staging=pool)
    assert rec.allocated == [] and pool.nbytes == 0  # CPU tensors: today's plain copies
    assert snap.release is not None and pool.in_use
    unpooled = snapshot(Tracked(model=model, optimizer=opt), counters=Counters(step=1),
                        staging=pool)  # fmt: skip
    assert unpooled.release is None  # the first one is not written yet: no lease
    live = snapshot(Tracked(model=model), counters=Counters(step=1), staging=pool, clone=False)
    assert live.release is None  # a synchronous save copies nothing
    write_snapshot(snap, tmp_path / "a", consume=True)
    assert not pool.in_use
    fresh = TinyNet()
    restore(tmp_path / "a", Tracked(model=fresh))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_failed_write_hands_the_buffers_back(tmp_path: Path) -> None:
    pool = Recorder().pool()
    snap = snapshot(Tracked(model=TinyNet()), counters=Counters(step=1), staging=pool)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        write_snapshot(snap, blocker, consume=True)
    assert not pool.in_use


def test_chooser_counts_the_pool_as_room_and_releases_it_when_saving_turns_synchronous() -> None:
    pool = Recorder().pool()
    _stage(pool, {"w": torch.ones(300, 10**6, dtype=torch.uint8)})  # 0.3 GB held
    free = [GB]
    said: list[str] = []
    status: list[dict[str, object]] = []
    chooser = SaveChooser(
        "auto", say=said.append, on_status=status.append, buffers=pool, available=lambda: free[0]
    )
    assert not chooser.background(GB + 10**8)  # 1.1 GB + 0.54 GB margin > 1 + 0.3 GB
    assert pool.nbytes == 0
    assert len(said) == 1 and "released 300.0 MB of pinned staging buffers" in said[0]
    assert status == [
        {
            "checkpoint_mode": "synchronous (state 1.1 GB does not fit twice in host memory, "
            "1.3 GB free)"
        }
    ]
    free[0] = 3 * GB
    assert chooser.background(GB)
    _stage(pool, {"w": torch.ones(300, 10**6, dtype=torch.uint8)})
    free[0] = GB  # the pool's 0.3 GB no longer counts as free for the system...
    assert chooser.background(GB - 3 * 10**8)  # ...but 0.7 + 0.54 <= 1 + 0.3: still fits
    assert pool.nbytes == 300 * 10**6 and len(said) == 2
