"""Defaults from the field: precision, gradient checkpointing, micro-batch size, resources.

The tips every Colab guide gives, as functions of what the machine can do:

- ``choose_precision(requested, caps)``: bf16 where the GPU supports it (A100, L4, H100),
  fp16 with loss scaling where it does not (T4, V100), fp32 on CPU. A pure function of a
  ``DeviceCaps`` (``DeviceCaps.detect()`` reads the real device), so it is tested without mocks.
- ``needs_gradient_checkpointing(...)``: on request, or ``auto`` when weights, gradients and
  AdamW moments (about parameters x bytes x 4 for full fine-tuning) would crowd out free GPU
  memory; never on CPU.
- ``search_micro_batch(effective, try_batch)``: the largest micro-batch that fits, trying
  divisors of the effective batch from small to large (growing while memory allows) and
  accumulating the rest, so ``micro x grad_accum`` stays the effective batch and a resume
  stays exact. The kinds record the result in every checkpoint and reuse it on resume.
- ``resource_line()``: GPU memory used/total, host RAM, disk free, for the log.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from colabjob.errors import ConfigError

__all__ = [
    "BatchChoice",
    "DeviceCaps",
    "Precision",
    "choose_precision",
    "divisors",
    "is_oom",
    "needs_gradient_checkpointing",
    "resource_line",
    "search_micro_batch",
    "training_memory_bytes",
]

Precision = Literal["fp32", "fp16", "bf16"]
GiB = 1024**3


@dataclass(frozen=True, kw_only=True)
class DeviceCaps:
    """What the training device can do. ``free_memory``/``total_memory`` in bytes (GPU only)."""

    kind: Literal["cpu", "cuda", "mps"] = "cpu"
    name: str = "cpu"
    bf16: bool = False
    fp16: bool = False
    total_memory: int | None = None
    free_memory: int | None = None

    @classmethod
    def detect(cls) -> DeviceCaps:
        """The first CUDA device if there is one, else the CPU (MPS counts as fp32 here)."""
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return cls(
                kind="cuda",
                name=torch.cuda.get_device_name(0),
                bf16=bool(torch.cuda.is_bf16_supported()),
                fp16=True,
                total_memory=int(total),
                free_memory=int(free),
            )
        return cls()


def choose_precision(requested: str, caps: DeviceCaps) -> tuple[Precision, str]:
    """The precision to train in and one line saying why.

    ``auto``: bf16 where supported, else fp16 with loss scaling on a GPU, fp32 on CPU. An
    explicit request the device cannot honour raises ``ConfigError``.
    """
    if requested not in ("auto", "fp32", "fp16", "bf16"):
        raise ConfigError(f"precision {requested!r}: one of auto, fp32, fp16, bf16")
    if requested == "fp32":
        return "fp32", f"precision fp32 (requested) on {caps.name}"
    if caps.kind != "cuda":
        if requested != "auto":
            raise ConfigError(
                f"training.precision: {requested} needs a CUDA GPU; this run is on {caps.name}",
                hint="use precision: auto (fp32 on CPU) or fp32",
            )
        return "fp32", f"precision fp32: no GPU ({caps.name})"
    if requested == "bf16" and not caps.bf16:
        raise ConfigError(
            f"training.precision: bf16 is not supported by {caps.name}",
            hint="use precision: auto (fp16 with loss scaling on this GPU)",
        )
    if requested == "bf16" or (requested == "auto" and caps.bf16):
        return "bf16", f"precision bf16 on {caps.name}"
    return "fp16", f"precision fp16 with loss scaling on {caps.name} (no bf16 support)"


def training_memory_bytes(
    *, params: int, trainable: int | None = None, bytes_per_param: int = 4
) -> int:
    """Static training memory: weights, plus gradients and two AdamW moments (fp32) for the
    trainable parameters. Full fine-tuning in fp32 is about ``params x 4 x 4`` bytes."""
    trainable = params if trainable is None else trainable
    return params * bytes_per_param + trainable * (bytes_per_param + 8)


def needs_gradient_checkpointing(
    setting: bool | str,
    *,
    caps: DeviceCaps,
    params: int,
    trainable: int | None = None,
    bytes_per_param: int = 4,
    headroom: float = 0.7,
) -> tuple[bool, str]:
    """Whether to recompute activations, and why. ``auto`` turns it on when the static
    training memory would take more than ``headroom`` of the free GPU memory (activations
    need the rest); never on CPU."""
    if setting is True or setting is False:
        return bool(setting), f"gradient checkpointing {'on' if setting else 'off'} (requested)"
    if setting != "auto":
        raise ConfigError(f"gradient_checkpointing {setting!r}: true, false or auto")
    if caps.kind != "cuda" or not caps.free_memory:
        return False, "gradient checkpointing off (auto: not on a GPU)"
    need = training_memory_bytes(
        params=params, trainable=trainable, bytes_per_param=bytes_per_param
    )
    on = need > headroom * caps.free_memory
    why = (
        f"gradient checkpointing {'on' if on else 'off'} (auto: weights+grads+AdamW "
        f"~{need / GiB:.1f} GiB vs {caps.free_memory / GiB:.1f} GiB free)"
    )
    return on, why


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``, ascending."""
    if n < 1:
        raise ValueError(f"divisors of {n}")
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA, cuDNN, CPU allocator)."""
    try:
        from accelerate.utils.memory import should_reduce_batch_size

        if should_reduce_batch_size(exc):  # type: ignore[arg-type, unused-ignore]
            return True
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    text = str(exc)
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in text.lower()
    )


@dataclass(frozen=True, kw_only=True)
class BatchChoice:
    """A micro-batch and the accumulation that keeps the effective batch."""

    micro_batch: int
    grad_accum: int
    tried: tuple[int, ...] = ()

    @property
    def effective(self) -> int:
        return self.micro_batch * self.grad_accum


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def search_micro_batch(
    effective: int,
    try_batch: Callable[[int], None],
    *,
    start: int = 1,
    limit: int | None = None,
    oom: Callable[[BaseException], bool] = is_oom,
    cleanup: Callable[[], None] = _free_memory,
) -> BatchChoice:
    """Grow the micro-batch over the divisors of ``effective`` (from ``start``, up to
    ``limit``) while ``try_batch(size)`` (one forward and backward at that size) succeeds;
    the largest that fit wins and ``grad_accum = effective // micro``. An OOM at the
    smallest size raises ``ConfigError``; any other error propagates."""
    candidates = [d for d in divisors(effective) if d >= start and (limit is None or d <= limit)]
    if not candidates:
        raise ConfigError(f"no micro-batch between {start} and {limit} divides {effective}")
    best: int | None = None
    tried: list[int] = []
    for size in candidates:
        tried.append(size)
        fits = True
        try:
            try_batch(size)
        except Exception as e:
            if not oom(e):
                raise
            fits = False
        # Outside the ``except``: the exception's traceback holds the failed attempt's frames
        # (and their tensors) until the block is left, so freeing memory inside it frees nothing.
        cleanup()
        if not fits:
            break
        best = size
    if best is None:
        raise ConfigError(
            f"a micro-batch of {candidates[0]} does not fit in memory",
            hint="turn on model.gradient_checkpointing, shorten data.seq_len, or use LoRA",
        )
    return BatchChoice(micro_batch=best, grad_accum=effective // best, tried=tuple(tried))


def _host_memory() -> tuple[int, int] | None:
    """(used, total) bytes of host RAM: psutil if present, else /proc/meminfo."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total - vm.available), int(vm.total)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info = {
                line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line
            }
        return info["MemTotal"] - info.get("MemAvailable", info.get("MemFree", 0)), info[
            "MemTotal"
        ]
    except (OSError, KeyError, ValueError, IndexError):
        return None


def resource_line(path: str | os.PathLike[str] = ".") -> str:
    """``GPU 3.1/15.0 GiB · RAM 5.2/12.7 GiB · disk 70.1 GiB free`` (what is known)."""
    parts: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            parts.append(f"GPU {(total - free) / GiB:.1f}/{total / GiB:.1f} GiB")
    except Exception:  # a broken CUDA setup must not stop training over a log line
        pass
    ram = _host_memory()
    if ram is not None:
        parts.append(f"RAM {ram[0] / GiB:.1f}/{ram[1] / GiB:.1f} GiB")
    with contextlib.suppress(OSError):
        parts.append(f"disk {shutil.disk_usage(path).free / GiB:.1f} GiB free")
    return " · ".join(parts) if parts else "resources unknown"
