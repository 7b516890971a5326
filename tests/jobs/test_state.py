"""Exact-state tests: a run split into sessions equals one straight run, bit for bit.

Every resumed session builds fresh objects from another seed and restores from files, so
any state we forgot (an RNG, the scaler, the data position, the scheduler) shows up as a
different loss or weight. Also: pickles are never executed, LoRA saves only adapters, tied
weights are stored once, geometry changes are refused unless allowed.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import random
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from colabjob.errors import (
    CheckpointError,
    GeometryChangedError,
    ResumeError,
    UnsafeCheckpointError,
)
from colabjob.jobs.data import Geometry, make_loader
from colabjob.jobs.state import tracked as tracked_module
from colabjob.jobs.state.capture import snapshot, write_snapshot
from colabjob.jobs.state.format import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, Counters
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.rng import GeneratorState, capture_rng, restore_rng
from colabjob.jobs.state.tracked import OPTIMIZER, SCALER, SCHEDULER, SLOTS, Tracked

from .helpers import (
    NoisyDataset,
    TinyNet,
    Trainer,
    assert_same_model,
    hf_iterable,
    run_split,
    run_straight,
    tiny_gpt2,
)

TOTAL = 13
# 42 samples / batch 4 = 11 batches per epoch (last one of 2); 4 micro-batches per step, so
# step 11 ends exactly at an epoch end and the run crosses four epoch boundaries.
SPLITS = [3, 7, 11]


def _assert_same_run(straight: Trainer, split: Trainer) -> None:
    assert split.counters == straight.counters
    assert split.metrics == straight.metrics  # losses, sample indices, lr of every step
    assert_same_model(straight.model, split.model)
    for a, b in zip(straight.optimizer.state.values(), split.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.scaler.state_dict() == split.scaler.state_dict()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_split_run_is_bit_identical_map_style(tmp_path: Path, num_workers: int) -> None:
    def loader() -> Any:
        return make_loader(NoisyDataset(42), batch_size=4, seed=11, num_workers=num_workers)

    straight = run_straight(loader, total=TOTAL)
    split = run_split(loader, total=TOTAL, splits=SPLITS, workdir=tmp_path)
    assert straight.counters.epoch == 4
    _assert_same_run(straight, split)


def test_split_run_is_bit_identical_hf_iterable(tmp_path: Path) -> None:
    def loader() -> Any:
        return make_loader(hf_iterable(42), batch_size=4, seed=11)

    straight = run_straight(loader, total=TOTAL)
    split = run_split(loader, total=TOTAL, splits=SPLITS, workdir=tmp_path)
    _assert_same_run(straight, split)


def test_split_run_differs_without_rng_restore(tmp_path: Path) -> None:
    """The bit-identical tests can fail: drop the RNG restore and the losses change."""
    tr = Trainer.build(
        make_loader(NoisyDataset(42), batch_size=4, seed=11), init_seed=0, total_steps=4
    )
    tr.train_until(2)
    tr.save(tmp_path)
    tr.train_until(4)
    fresh = Trainer.build(
        make_loader(NoisyDataset(42), batch_size=4, seed=11), init_seed=5, total_steps=4
    )
    got = restore(tmp_path, fresh.tracked(), restore_rngs=False)
    fresh.counters, fresh.metrics = got.counters, got.metrics
    fresh.train_until(4)
    assert fresh.metrics[:2] == tr.metrics[:2]
    assert fresh.metrics[2]["indices"] == tr.metrics[2]["indices"]  # same data ...
    assert fresh.metrics[2]["losses"] != tr.metrics[2]["losses"]  # ... other dropout/noise


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_planted_pickle_is_refused(tmp_path: Path, how: str) -> None:
    tr = Trainer.build(
        make_loader(NoisyDataset(8), batch_size=4, seed=1), init_seed=0, total_steps=2
    )
    tr.train_until(1)
    tr.save(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    payload = {"optimizer": _Evil(marker), "scheduler": None, "scaler": None}
    # Only an older checkpoint (optimizer.pt; state.json without "optimizer_file") unpickles.
    doc = json.loads((tmp_path / "ckpt" / STATE_FILE).read_text())
    del doc["optimizer_file"]
    (tmp_path / "ckpt" / STATE_FILE).write_text(json.dumps(doc))
    if how == "torch_save":
        torch.save(payload, tmp_path / "ckpt" / OPTIMIZER_FILE)
    else:
        (tmp_path / "ckpt" / OPTIMIZER_FILE).write_bytes(pickle.dumps(payload))
    # the payload is live: plain unpickling runs it
    pickle.loads(pickle.dumps(_Evil(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()

    fresh = Trainer.build(
        make_loader(NoisyDataset(8), batch_size=4, seed=1), init_seed=3, total_steps=2
    )
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError):
        restore(tmp_path / "ckpt", replace(fresh.tracked(), geometry=None))
    assert not marker.exists()
    for k, v in fresh.model.state_dict().items():  # refused before anything was loaded
        assert torch.equal(v, before[k])


def test_geometry_change_refused_then_allowed(tmp_path: Path) -> None:
    tr = Trainer.build(
        make_loader(NoisyDataset(16), batch_size=4, seed=1), init_seed=0, total_steps=2
    )
    tr.train_until(1)
    tr.save(tmp_path)
    model = TinyNet()
    changed = Tracked(model=model, geometry=Geometry(batch_size=8, grad_accum=2))
    with pytest.raises(GeometryChangedError) as info:
        restore(tmp_path, changed)
    text = str(info.value)
    assert "batch_size 4 -> 8" in text and "grad_accum 4 -> 2" in text
    assert "--allow-geometry-change" in text
    with pytest.warns(UserWarning, match="geometry"):
        got = restore(tmp_path, changed, allow_geometry_change=True)
    assert got.geometry_changed == ("batch_size", "grad_accum")
    assert got.counters.samples_seen == 16
    assert_same_model(model, tr.model)


def test_snapshot_refused_mid_accumulation() -> None:
    with pytest.raises(CheckpointError, match="micro-step 2"):
        snapshot(Tracked(model=TinyNet()), counters=Counters(step=3, micro_step=2))


def test_counters() -> None:
    c = Counters()
    for _ in range(3):
        c = c.after_micro_batch(samples=4, tokens=40, grad_accum=3)
    assert (c.step, c.micro_step, c.samples_seen, c.tokens_seen) == (1, 0, 12, 120)
    assert c.at_optimizer_boundary
    assert not c.after_micro_batch(samples=1, grad_accum=3).at_optimizer_boundary
    assert Counters.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        Counters(step=-1)


def test_snapshot_is_a_copy(tmp_path: Path) -> None:
    model = TinyNet()
    snap = snapshot(Tracked(model=model), counters=Counters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    write_snapshot(snap, tmp_path)
    fresh = TinyNet()
    restore(tmp_path, Tracked(model=fresh))
    for (k, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a + 1.0, b), k


def test_tied_weights_stored_once_and_stay_tied(tmp_path: Path) -> None:
    model = tiny_gpt2(seed=0)
    assert model.lm_head.weight is model.transformer.wte.weight
    write_snapshot(snapshot(Tracked(model=model), counters=Counters()), tmp_path)
    stored = load_file(str(tmp_path / MODEL_FILE))
    assert ("lm_head.weight" in stored) != ("transformer.wte.weight" in stored)
    fresh = tiny_gpt2(seed=1)
    restore(tmp_path, Tracked(model=fresh))
    assert_same_model(model, fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


def _lora(seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(seed=0), LoraConfig(r=2, target_modules=["c_attn"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()  # lora_B starts at zero; make every adapter tensor distinctive
    return model


def test_lora_saves_only_adapters_and_restores_exactly(tmp_path: Path) -> None:
    model = _lora(seed=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 50, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    write_snapshot(snapshot(Tracked(model=model, optimizer=opt), counters=Counters(step=1)),
                   tmp_path)  # fmt: skip

    stored = load_file(str(tmp_path / MODEL_FILE))
    assert set(stored) == trainable and all("lora_" in k for k in stored)
    assert json.loads((tmp_path / STATE_FILE).read_text())["model"]["trainable_only"] is True

    fresh = _lora(seed=2)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    restore(tmp_path, Tracked(model=fresh, optimizer=fresh_opt))
    assert_same_model(model, fresh)
    a, b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_lora_restore_refuses_missing_adapters(tmp_path: Path) -> None:
    write_snapshot(snapshot(Tracked(model=_lora(seed=1)), counters=Counters()), tmp_path)
    from peft import LoraConfig, get_peft_model

    wider = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    with pytest.raises(ResumeError, match="lacks"):
        restore(tmp_path, Tracked(model=wider))


class _UserState:
    def __init__(self, state: dict[Any, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[Any, Any]:
        return self.state

    def load_state_dict(self, state: dict[Any, Any]) -> None:
        self.state = state


def test_extra_objects_round_trip_without_pickle(tmp_path: Path) -> None:
    state = {
        "ema": torch.arange(6.0).reshape(2, 3).t(),  # non-contiguous
        "shared": [torch.ones(2)] * 2,
        3: ("tuple", 1.5, None, True),
        "np": np.arange(4, dtype=np.uint32),
        "raw": b"\x00\xff",
        "__tensor__": "not a marker",
    }
    gen = np.random.default_rng(5)
    gen.random(3)
    extras = {"user": _UserState(state), "np_rng": GeneratorState(gen)}
    write_snapshot(snapshot(Tracked(extras=extras), counters=Counters()), tmp_path)
    expected_draw = gen.random(4)

    user, gen2 = _UserState({}), np.random.default_rng(0)
    restore(tmp_path, Tracked(extras={"user": user, "np_rng": GeneratorState(gen2)}))
    got = user.state
    assert torch.equal(got["ema"], state["ema"]) and got[3] == state[3]
    assert all(torch.equal(t, torch.ones(2)) for t in got["shared"])
    assert got["np"].dtype == np.uint32 and list(got["np"]) == [0, 1, 2, 3]
    assert got["raw"] == b"\x00\xff" and got["__tensor__"] == "not a marker"
    assert np.array_equal(gen2.random(4), expected_draw)


def test_global_rngs_round_trip() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in the legacy state
    state = capture_rng()
    plain = json.loads(json.dumps(state.plain()))
    expected = (random.random(), np.random.randn(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(type(state).from_parts(plain, state.tensors()))
    got = (random.random(), np.random.randn(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_a_new_slot_is_one_definition(tmp_path: Path) -> None:
    """Every tracked object is a field of ``Tracked``: snapshot and restore take the object,
    not a keyword per slot, and the key constants are exactly the slot fields."""
    fields_ = {f.name for f in fields(Tracked)}
    for fn in (snapshot, restore):
        params = inspect.signature(fn).parameters
        assert "tracked" in params and not fields_ & set(params), fn.__name__
    public = {k: v for k, v in vars(tracked_module).items() if k in tracked_module.__all__}
    constants = {v for k, v in public.items() if k.isupper() and isinstance(v, str)}
    assert constants == set(SLOTS) and set(SLOTS) < fields_  # trainable_only: an option
    assert len(SLOTS) == len(set(SLOTS)) == 7
    # the optimizer-state keys a checkpoint holds are the slots' own keys
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    write_snapshot(snapshot(Tracked(model=model, optimizer=opt), counters=Counters()), tmp_path)
    parts = json.loads((tmp_path / STATE_FILE).read_text())["optimizer"]
    assert list(parts) == [k for k, _ in Tracked().optimizer_parts()] == [
        OPTIMIZER, SCHEDULER, SCALER,
    ]  # fmt: skip
    assert parts == {OPTIMIZER: True, SCHEDULER: False, SCALER: False}
