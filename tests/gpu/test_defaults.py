"""The defaults from the field on a real GPU (``colabjob.jobs.defaults`` and the kinds' use of
them in ``colabjob.jobs.kinds.hf_trainer``): what ``DeviceCaps.detect()`` reads and the precision it
picks, gradient checkpointing turned on by ``_checkpointing`` (same gradients, less memory),
and the micro-batch search of ``plan_training`` meeting a real CUDA out-of-memory error.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from colabjob.config import JobSpec
from colabjob.errors import ConfigError
from colabjob.jobs.context import SegmentContext
from colabjob.jobs.defaults import (
    DeviceCaps,
    choose_precision,
    is_oom,
    needs_gradient_checkpointing,
    search_micro_batch,
    training_memory_bytes,
)
from colabjob.jobs.kinds import hf_trainer as hf_job
from colabjob.jobs.kinds.hf_trainer import _checkpointing, plan_training
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore

GiB = 1024**3


def _gpt2(seed: int = 0, **config: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, **config)
    return GPT2LMHeadModel(cfg).to("cuda")


# -- precision -------------------------------------------------------------------------------
def test_precision_auto_choice_on_this_device(cuda_memory: None) -> None:
    caps = DeviceCaps.detect()
    props = torch.cuda.get_device_properties(0)
    assert caps.kind == "cuda" and caps.fp16 and caps.name == props.name
    assert caps.bf16 == torch.cuda.is_bf16_supported()
    assert caps.total_memory is not None  # cudaMemGetInfo's total: the device's, near enough
    assert abs(caps.total_memory - props.total_memory) <= 0.02 * props.total_memory
    assert caps.free_memory is not None and 0 < caps.free_memory <= caps.total_memory
    precision, why = choose_precision("auto", caps)
    assert precision == ("bf16" if caps.bf16 else "fp16") and caps.name in why
    assert choose_precision("fp32", caps)[0] == "fp32"
    assert choose_precision("fp16", caps)[0] == "fp16"
    if caps.bf16:
        assert choose_precision("bf16", caps)[0] == "bf16"
    else:
        with pytest.raises(ConfigError, match="bf16 is not supported"):
            choose_precision("bf16", caps)

    # the chosen precision trains here: autocast in it, a scaler only for fp16
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = _gpt2(n_layer=1, n_embd=64, n_head=2, n_positions=64, vocab_size=128)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=precision == "fp16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (4, 64), device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=dtype):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype
    scaler.scale(out.loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(out.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_gradient_checkpointing_auto_reads_the_free_memory() -> None:
    caps = DeviceCaps.detect()
    assert caps.free_memory is not None
    small = 124_000_000  # GPT-2: ~2 GB of weights, gradients and AdamW moments
    assert needs_gradient_checkpointing("auto", caps=caps, params=small)[0] is (
        training_memory_bytes(params=small) > 0.7 * caps.free_memory
    )
    huge = caps.free_memory // 8  # 16 bytes a parameter: twice the free memory
    on, why = needs_gradient_checkpointing("auto", caps=caps, params=huge)
    assert on and "GiB free" in why


# -- gradient checkpointing ------------------------------------------------------------------
def _grads_and_peak(model: Any, ids: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads, peak


def _checkpointed(model: Any) -> bool:
    """Whether a layer recomputes its activations (the flag every transformers version sets)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def test_gradient_checkpointing_same_gradients_less_memory(cuda_memory: None) -> None:
    model = _gpt2(n_layer=6, n_embd=256, n_head=4, n_positions=1024, vocab_size=1024)
    model.train()
    ids = torch.randint(0, 1024, (8, 1024), device="cuda")
    plain, peak_plain = _grads_and_peak(model, ids)
    _checkpointing(model, True)  # what plan_training / the Trainer arguments turn on
    assert _checkpointed(model)
    recomputed, peak_ckpt = _grads_and_peak(model, ids)
    _checkpointing(model, False)
    assert not _checkpointed(model)
    assert len(plain) == len(recomputed) == len(list(model.parameters()))
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # attention backward may use atomics
    print(f"\ngradient checkpointing: peak {peak_ckpt / 2**20:.0f} MiB vs {peak_plain / 2**20:.0f}")
    assert peak_ckpt < 0.8 * peak_plain  # activations of 6 layers were not all kept


# -- the micro-batch search ------------------------------------------------------------------
HEADROOM = 6 * GiB  # what is left free for the search: batch 1 fits, batch 64 cannot


@contextlib.contextmanager
def _occupy_all_but(headroom: int) -> Iterator[None]:
    """Hold all free GPU memory but ``headroom``: later allocations meet a real OOM."""
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - headroom), dtype=torch.uint8, device="cuda")
    try:
        yield
    finally:
        del hog
        gc.collect()
        torch.cuda.empty_cache()


def test_batch_size_search_meets_a_real_oom(tmp_path: Path, cuda_memory: None) -> None:
    spec = JobSpec.from_dict(
        {
            "job": {"name": "oom", "kind": "scratch"},
            "model": {"architecture": "gpt2", "gradient_checkpointing": False},
            "tokenizer": {"train": {"vocab_size": 50257}},
            "data": {"source": "unused.txt", "seq_len": 1024},
            "training": {"max_steps": 1, "batch_size": 64, "auto_batch_size": True},
        }
    )
    store = open_store(tmp_path / "job")
    ctx = SegmentContext(store=store, checkpoints=CheckpointStore(store))
    model = _gpt2(n_layer=2, n_embd=256, n_head=4, n_positions=1024)  # 50257-token logits
    seen: list[tuple[str, bool]] = []

    def spy(e: BaseException) -> bool:  # keeps no reference: the error holds the memory
        seen.append((type(e).__name__, is_oom(e)))
        return is_oom(e)

    def search(effective: int, try_batch: Any, **kw: Any) -> Any:
        return search_micro_batch(effective, try_batch, oom=spy, **kw)

    with _occupy_all_but(HEADROOM), pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_job, "search_micro_batch", search)
        base = torch.cuda.memory_allocated()  # the model and what holds the rest of the GPU
        plan = plan_training(spec, ctx, model)
        gc.collect()
        left = torch.cuda.memory_allocated() - base
        # the chosen micro-batch trains in the memory the search found
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, 50257, (plan.micro_batch, 1024), device="cuda")
        dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    print(f"\nsearch: {plan.notes[-1]}; OOM seen as {seen}")
    assert seen and seen[-1] == ("OutOfMemoryError", True)  # a real CUDA OOM ended the search
    assert 1 <= plan.micro_batch < 64 and plan.micro_batch * plan.grad_accum == 64
    assert not plan.gradient_checkpointing
    assert f"micro-batch {plan.micro_batch} x {plan.grad_accum}" in plan.notes[-1]
    assert left < 256 * 2**20  # the failed attempt's activations were given back (cuBLAS
    # workspaces, a few MiB, may stay)
