"""Defaults from the field as pure functions: precision from device capabilities (passed in,
no mocks), gradient checkpointing from a memory estimate, the micro-batch search against a
fake OOM-raising step (the effective batch never changes), and the resource line; and the
kinds record the micro-batch in every checkpoint and reuse the recorded one on resume.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest

from colabjob.config import JobSpec
from colabjob.errors import ConfigError
from colabjob.jobs.defaults import (
    DeviceCaps,
    choose_precision,
    divisors,
    needs_gradient_checkpointing,
    resource_line,
    search_micro_batch,
    training_memory_bytes,
)
from colabjob.jobs.kinds.hf_trainer import plan_training, training_arguments
from tests.jobs.kind_fixtures import make_ctx

GiB = 1024**3
CPU = DeviceCaps()
T4 = DeviceCaps(kind="cuda", name="Tesla T4", bf16=False, fp16=True,
                total_memory=15 * GiB, free_memory=14 * GiB)
A100 = DeviceCaps(kind="cuda", name="NVIDIA A100-SXM4-40GB", bf16=True, fp16=True,
                  total_memory=40 * GiB, free_memory=39 * GiB)


@pytest.mark.parametrize(
    ("requested", "caps", "expected"),
    [
        ("auto", CPU, "fp32"),
        ("auto", T4, "fp16"),
        ("auto", A100, "bf16"),
        ("fp16", A100, "fp16"),
        ("fp32", T4, "fp32"),
        ("fp32", CPU, "fp32"),
    ],
)
def test_precision_follows_the_device(requested: str, caps: DeviceCaps, expected: str) -> None:
    precision, why = choose_precision(requested, caps)
    assert precision == expected
    assert caps.name in why and expected in why


def test_precision_the_device_cannot_do_is_refused() -> None:
    with pytest.raises(ConfigError, match="bf16 is not supported by Tesla T4"):
        choose_precision("bf16", T4)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        choose_precision("fp16", CPU)
    assert "loss scaling" in choose_precision("auto", T4)[1]


def test_gradient_checkpointing_auto_from_the_memory_estimate() -> None:
    one_b = 1_000_000_000
    assert training_memory_bytes(params=one_b) == one_b * 16  # fp32 AdamW: 4 x 4 bytes
    assert needs_gradient_checkpointing("auto", caps=T4, params=one_b)[0]  # 16 GB > 14 GiB
    assert not needs_gradient_checkpointing("auto", caps=A100, params=124_000_000)[0]
    assert not needs_gradient_checkpointing("auto", caps=CPU, params=10 * one_b)[0]
    # LoRA: a frozen fp16 base of 1B with 4M trainable parameters fits a T4
    on, why = needs_gradient_checkpointing(
        "auto", caps=T4, params=one_b, trainable=4_000_000, bytes_per_param=2
    )
    assert not on and "GiB free" in why
    assert needs_gradient_checkpointing(True, caps=CPU, params=1)[0]
    assert not needs_gradient_checkpointing(False, caps=T4, params=10 * one_b)[0]


def test_micro_batch_search_grows_until_oom_and_keeps_the_effective_batch() -> None:
    tried: list[int] = []

    def step(size: int) -> None:  # a fake step: more than 8 samples do not fit
        tried.append(size)
        if size > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    choice = search_micro_batch(48, step)
    assert tried == [1, 2, 3, 4, 6, 8, 12]  # divisors of 48, small first, stop at the OOM
    assert (choice.micro_batch, choice.grad_accum) == (8, 6)
    assert choice.effective == 48
    assert search_micro_batch(32, step, start=2).tried == (2, 4, 8, 16)


def test_micro_batch_search_frees_the_failed_attempt_before_cleaning_up() -> None:
    class Activations:  # stands for the tensors a failed forward pass left in its frames
        pass

    held: list[weakref.ref[Activations]] = []
    alive_at_cleanup: list[bool] = []

    def step(size: int) -> None:
        activations = Activations()
        held.append(weakref.ref(activations))
        if size > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def cleanup() -> None:
        alive_at_cleanup.append(held[-1]() is not None)

    choice = search_micro_batch(8, step, cleanup=cleanup)
    assert choice.micro_batch == 2
    # the OOM's traceback (which keeps the failed attempt's locals) is gone by cleanup time
    assert alive_at_cleanup == [False, False, False]


def test_micro_batch_search_fits_everything_or_nothing() -> None:
    assert search_micro_batch(16, lambda size: None).micro_batch == 16
    with pytest.raises(ConfigError, match="does not fit"):
        search_micro_batch(16, _always_oom)
    with pytest.raises(ValueError, match="not memory"):
        search_micro_batch(16, _broken)
    assert divisors(12) == [1, 2, 3, 4, 6, 12]


def _always_oom(size: int) -> None:
    raise torch_oom()


def torch_oom() -> BaseException:
    import torch

    return torch.OutOfMemoryError("CUDA out of memory")


def _broken(size: int) -> None:
    raise ValueError("not memory")


def _spec(tmp_path: Path, **training: object) -> JobSpec:
    return JobSpec.from_dict({
        "job": {"name": "d", "kind": "finetune"},
        "model": str(tmp_path),
        "data": {"source": str(tmp_path), "seq_len": 8},
        "training": {"batch_size": 4, "grad_accum": 2, "max_steps": 3, **training},
    })


def test_a_recorded_micro_batch_is_reused_on_resume(tmp_path: Path) -> None:
    from tests.jobs.helpers import tiny_gpt2

    ctx = make_ctx(tmp_path / "job")
    spec = _spec(tmp_path, auto_batch_size=True)
    model = tiny_gpt2()
    fresh = plan_training(spec, ctx, model, caps=CPU)
    assert (fresh.micro_batch, fresh.grad_accum, fresh.precision) == (4, 2, "fp32")
    assert any("no GPU" in n for n in fresh.notes)
    ctx.checkpoints.save(1, {"x": b"1"}, meta={"batch": {"micro_batch": 2, "grad_accum": 4}})
    resumed = plan_training(spec, ctx, model, caps=CPU)
    assert (resumed.micro_batch, resumed.grad_accum) == (2, 4)
    args = training_arguments(spec, resumed, str(tmp_path / "out"))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)
    assert args.save_strategy == "no" and not args.fp16 and not args.bf16
    with pytest.raises(ConfigError, match="samples per step"):
        plan_training(_spec(tmp_path, batch_size=3), ctx, model, caps=CPU)


def test_resource_line_names_ram_and_disk(tmp_path: Path) -> None:
    line = resource_line(tmp_path)
    assert "RAM" in line and "GiB free" in line
