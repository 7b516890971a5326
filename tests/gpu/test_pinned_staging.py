"""Background snapshots of GPU state go through pinned host buffers allocated once: two
consecutive checkpoints copy into the same page-locked memory (model weights and AdamW's
moments alike), each copy holds the values of its step, and weights restored from the files
equal the live ones. Through the Session API the pool ends up one state in size. Nothing is
timed (``test_snapshot_stall.py`` prints the stall)."""

from __future__ import annotations

from pathlib import Path

import torch

from colabjob.jobs.context import SegmentContext
from colabjob.jobs.data import make_loader
from colabjob.jobs.session import Session
from colabjob.jobs.state.capture import snapshot, write_snapshot
from colabjob.jobs.state.format import Counters
from colabjob.jobs.state.pinned import StagingPool
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.tracked import Tracked
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)
    ).to("cuda")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(16, 64, device="cuda")
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _device_tensors(snap_part: object) -> dict[str, torch.Tensor]:
    """The snapshot's model tensors and AdamW moments, by name."""
    out: dict[str, torch.Tensor] = {}
    assert isinstance(snap_part, dict)
    for key, t in (snap_part.get("model") or {}).items():
        out[f"model/{key}"] = t
    for pid, st in snap_part["optimizer"]["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            out[f"opt/{pid}/{name}"] = st[name]
    return out


def test_two_checkpoints_reuse_the_same_pinned_buffers(tmp_path: Path, cuda_memory: None) -> None:
    model, opt = _model(0)
    pool = StagingPool()
    ptrs: list[dict[str, int]] = []
    for step in (1, 2):
        _train(model, opt)
        tracked = Tracked(model=model, optimizer=opt)
        snap = snapshot(tracked, counters=Counters(step=step), staging=pool)
        got = _device_tensors({"model": snap.model, "optimizer": snap.optimizer})
        assert got and all(t.is_pinned() for t in got.values())
        ptrs.append({k: t.data_ptr() for k, t in got.items()})
        for key, value in model.state_dict().items():  # the copy is complete on return
            assert torch.equal(got[f"model/{key}"], value.cpu()), key
        for pid, st in enumerate(opt.state.values()):
            assert torch.equal(got[f"opt/{pid}/exp_avg"], st["exp_avg"].cpu())
        write_snapshot(snap, tmp_path / str(step), consume=True)
        assert not pool.in_use
    assert ptrs[0] == ptrs[1]  # the same page-locked memory, not a new allocation
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = sum(  # AdamW's moments (and its step counts if it keeps them on the GPU)
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor) and v.device.type == "cuda"
    )
    assert pool.nbytes == state + moments
    fresh, fresh_opt = _model(1)
    restore(tmp_path / "2", Tracked(model=fresh, optimizer=fresh_opt))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert pool.clear() == state + moments and pool.nbytes == 0


class Points(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": torch.full((64,), float(index) / 64)}


def _ctx(root: Path) -> SegmentContext:
    store = open_store(root / "job")
    stage = root / "stage"
    return SegmentContext(
        store=store,
        checkpoints=CheckpointStore(store, staging_dir=stage),
        every_steps=1,
        max_steps=6,
        staging_dir=stage,
        async_checkpoint="true",
    )


def test_session_checkpoints_stage_through_one_state_sized_pool(
    tmp_path: Path, cuda_memory: None
) -> None:
    model, opt = _model(0)
    with Session(_ctx(tmp_path)) as s:
        s.track(model=model, optimizer=opt, loader=make_loader(Points(), batch_size=8, seed=3))
        for batch in s.batches():
            model(batch["x"].to("cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if s.step():
                break
        pool = s._saver.committer.staging
    assert s.outcome is not None and s.outcome.completed
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert pool.nbytes > weights  # the weights and AdamW's moments: one pinned copy, kept
    assert not pool.in_use
    fresh, fresh_opt = _model(1)
    with Session(_ctx(tmp_path)) as s2:
        got = s2.track(
            model=fresh, optimizer=fresh_opt, loader=make_loader(Points(), batch_size=8, seed=3)
        )
        assert got is not None and got.step == 6
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
