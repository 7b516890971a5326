"""Reproducible CPU math: what an exact resume needs from the BLAS under torch.

torch's x86-64 CPU build does its matrix products in Intel oneMKL, which by default runs
without Conditional Numerical Reproducibility (``MKL_VERBOSE`` prints ``CNR:OFF``) and with
dynamic threading (``Dyn:1``). Intel documents that results may then differ from run to run
on the same machine (code paths picked by data alignment, a thread count the library may
lower). In a job that shows, rarely, as a resumed run whose final weights differ from an
uninterrupted one in the last bits. Two settings remove it:

- ``MKL_CBWR=AUTO`` (unless the user chose a value): the fastest code path of this CPU, the
  same in every run. oneMKL reads it once, at its first call, so ``import colabjob`` sets it
  (``colabjob/__init__``: no torch is loaded then) and every process colabjob starts
  inherits it; a process that multiplied matrices before importing colabjob keeps its mode.
- ``pin_threads()``: ``torch.set_num_threads(torch.get_num_threads())`` keeps the thread count
  and, as a side effect torch documents in its source, turns oneMKL's dynamic threading off.
  Called where a segment's training starts (``Session``, the HF integration, the kinds).

Neither changes what a build without oneMKL does (aarch64, CUDA matmuls).
"""

from __future__ import annotations

__all__ = ["pin_threads"]


def pin_threads() -> None:
    """Keep torch's intra-op thread count and turn oneMKL's dynamic threading off."""
    import torch

    torch.set_num_threads(torch.get_num_threads())
