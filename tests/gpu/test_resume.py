"""Exact resume on a GPU, in-process: fp16 with a ``GradScaler``, bf16 autocast, the RNG of
every CUDA device.

Each run trains ``gpu_child``'s job (a dropout MLP on ``cuda``, AdamW, warmup LambdaLR,
accumulation 2) for ``TOTAL`` optimizer steps, once straight and once in segments that end
at ``CUTS`` by a stop policy (the final checkpoint of each is committed); every later
segment builds its objects from another seed, which also reseeds every CUDA device, so
only a complete restore through ``Session.track`` continues like the straight run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from colabjob.jobs.context import SegmentContext
from colabjob.jobs.policy import NeverStop, StopPolicy, StopReason
from colabjob.jobs.session import Session
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore
from tests.gpu.gpu_child import DTYPES, assert_same, build, final_state, train

TOTAL = 12
CUTS = (5, 9)


class StopAt(StopPolicy):
    """A ``StopPolicy``: stop (reason ``budget``) once the session reaches step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.session: Session | None = None

    def should_stop(self) -> StopReason | None:
        assert self.session is not None
        return StopReason.BUDGET if self.session.global_step >= self.at else None


@dataclass
class Run:
    final: dict[str, Any] = field(default_factory=dict)
    dtypes: set[torch.dtype] = field(default_factory=set)
    scaler_after: list[dict[str, Any]] = field(default_factory=list)  # [k]: after step k+1
    scaler_restored: dict[int, dict[str, Any]] = field(default_factory=dict)  # by resume step
    masks: list[tuple[torch.Tensor, ...]] = field(default_factory=list)  # per micro-batch
    rng_changed: list[bool] = field(default_factory=list)  # per resume: restore moved every RNG


def _cuda_states() -> list[torch.Tensor]:
    return [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]


def _masks() -> tuple[torch.Tensor, ...]:
    """One dropout mask drawn on every CUDA device (advances each device's generator)."""
    return tuple(
        torch.nn.functional.dropout(torch.ones(1024, device=f"cuda:{i}"), 0.5, training=True)
        != 0
        for i in range(torch.cuda.device_count())
    )


def _run(root: Path, precision: str, cuts: tuple[int, ...], *, draw_masks: bool = False) -> Run:
    run, start = Run(), 0
    for i, end in enumerate([*cuts, TOTAL]):
        o = build(precision, init_seed=1000 * i, total=TOTAL)
        policy: Any = NeverStop() if end == TOTAL else StopAt(end)
        store = open_store(root)
        ctx = SegmentContext(
            store=store,
            checkpoints=CheckpointStore(store),
            policy=policy,
            max_steps=TOTAL,
            every_steps=3,
            log_every_steps=1,
        )
        with Session(ctx) as s:
            if isinstance(policy, StopAt):
                policy.session = s
            fresh = _cuda_states()
            o.track(s)
            assert s.global_step == start
            if start:
                run.scaler_restored[start] = o.scaler.state_dict()
                run.rng_changed.append(
                    all(not torch.equal(a, b) for a, b in zip(fresh, _cuda_states(), strict=True))
                )
            run.dtypes |= set(
                train(
                    s,
                    o,
                    precision,
                    on_step=lambda o=o: run.scaler_after.append(o.scaler.state_dict()),
                    on_micro_batch=(lambda: run.masks.append(_masks())) if draw_masks else None,
                )
            )
        out = s.outcome
        assert out is not None and (out.last_step, out.checkpoint_step) == (end, end)
        assert out.completed == (end == TOTAL)
        start = end
    run.final = final_state(o, s.metrics)
    return run


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_resume_is_bit_identical(
    tmp_path: Path, precision: str, deterministic: None, cuda_memory: None
) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16 (needs Ampere or newer)")
    straight = _run(tmp_path / "straight", precision, ())
    split = _run(tmp_path / "split", precision, CUTS)
    assert straight.dtypes == split.dtypes == {DTYPES[precision]}  # autocast was on
    assert len(straight.final["metrics"]) == TOTAL
    assert_same(straight.final, split.final, "final")
    assert split.rng_changed == [True, True]
    if precision == "fp16":
        # scale and growth tracker continue exactly where each segment stopped...
        assert len(straight.scaler_after) == TOTAL
        for step, restored in split.scaler_restored.items():
            assert restored == straight.scaler_after[step - 1], step
        assert split.scaler_after == straight.scaler_after
        # ...and that took a restore: by the cuts they are not a fresh scaler's
        fresh = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=3)
        assert all(straight.scaler_after[c - 1] != fresh.state_dict() for c in CUTS)
        assert {s["_growth_tracker"] for s in straight.scaler_after} != {0}
    else:
        assert all(state == {} for state in split.scaler_restored.values())  # disabled scaler


def test_every_cuda_devices_rng_is_restored(
    tmp_path: Path, deterministic: None, cuda_memory: None
) -> None:
    """A dropout mask drawn on every device after each micro-batch: the resumed segments
    draw the straight run's masks, on every device."""
    straight = _run(tmp_path / "straight", "fp32", (), draw_masks=True)
    split = _run(tmp_path / "split", "fp32", CUTS, draw_masks=True)
    assert len(straight.masks) == TOTAL * 2 == len(split.masks)  # accumulation 2
    assert len(straight.masks[0]) == torch.cuda.device_count()
    for i, (want, got) in enumerate(zip(straight.masks, split.masks, strict=True)):
        for device, (a, b) in enumerate(zip(want, got, strict=True)):
            assert torch.equal(a, b), f"micro-batch {i}, cuda:{device}"
    assert split.rng_changed == [True, True]  # without the restore every device would differ
    assert_same(straight.final, split.final, "final")
