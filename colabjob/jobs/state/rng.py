"""Random number generator state: capture, restore and derive.

An exact resume needs every global RNG a training step draws from to continue where it
stopped: Python's ``random``, NumPy's *legacy* global ``np.random`` (``np.random.seed`` /
``np.random.rand``), the torch CPU generator and the generator of every CUDA device.
``capture_rng()`` copies them into an ``RngState`` (plain data plus CPU byte tensors),
``restore_rng()`` puts them back. NumPy's ``np.random.default_rng()`` generators are not
global: each is an object the user owns, so it is only saved if it is handed over as a
stateful object, for which ``GeneratorState`` adapts a ``numpy.random.Generator``,
``random.Random`` or ``torch.Generator`` to ``state_dict()`` / ``load_state_dict()``.
``derive_seed()`` mixes a base seed with labels (epoch, sample index, ...) into an
independent 63-bit seed; the data layer builds its per-epoch and per-sample generators on it,
and ``seed_everything()`` seeds every global RNG from one (a rank that a checkpoint holds no
RNG state for starts from ``derive_seed(seed, "rank", rank, "step", step)``).
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "GeneratorState",
    "RngState",
    "capture_rng",
    "derive_seed",
    "restore_rng",
    "seed_everything",
]


def derive_seed(seed: int, *labels: int | str) -> int:
    """An independent seed in ``[0, 2**63)`` for ``(seed, *labels)``; stable across runs."""
    text = "\x1f".join(str(part) for part in (seed, *labels))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True, kw_only=True)
class RngState:
    """Every global RNG of this process, copied to CPU memory.

    ``python`` and ``numpy`` are JSON-able; ``torch_cpu`` and each ``torch_cuda`` entry
    are uint8 CPU tensors (store them with safetensors).
    """

    python: list[Any]
    numpy: dict[str, Any]
    torch_cpu: torch.Tensor
    torch_cuda: tuple[torch.Tensor, ...] = field(default=())

    def plain(self) -> dict[str, Any]:
        """The JSON-able part (Python and NumPy state)."""
        return {"python": self.python, "numpy": self.numpy, "cuda_devices": len(self.torch_cuda)}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor part, keyed ``torch_cpu`` and ``torch_cuda.<i>``."""
        out = {"torch_cpu": self.torch_cpu}
        out.update({f"torch_cuda.{i}": t for i, t in enumerate(self.torch_cuda)})
        return out

    @classmethod
    def from_parts(cls, plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RngState:
        """Inverse of ``plain()`` + ``tensors()``."""
        n = int(plain.get("cuda_devices", 0))
        return cls(
            python=plain["python"],
            numpy=plain["numpy"],
            torch_cpu=tensors["torch_cpu"],
            torch_cuda=tuple(tensors[f"torch_cuda.{i}"] for i in range(n)),
        )


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "keys": [int(k) for k in keys],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def capture_rng() -> RngState:
    """Copy every global RNG. Touches CUDA only if ``torch.cuda.is_available()``."""
    cuda: tuple[torch.Tensor, ...] = ()
    if torch.cuda.is_available():
        cuda = tuple(t.clone() for t in torch.cuda.get_rng_state_all())
    return RngState(
        python=_python_state(),
        numpy=_numpy_state(),
        torch_cpu=torch.get_rng_state().clone(),
        torch_cuda=cuda,
    )


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's legacy global RNG and torch (CPU and every CUDA
    device) from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng(state: RngState) -> None:
    """Put every global RNG back as captured.

    CUDA states are restored for the devices both the checkpoint and this machine have; a
    different device count warns, because the resumed run can no longer be exact.
    """
    version, internal, gauss = state.python
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    n = state.numpy
    np.random.set_state(
        (
            n["kind"],
            np.asarray(n["keys"], dtype=np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state.torch_cpu.clone())
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have != len(state.torch_cuda) and state.torch_cuda:
        warnings.warn(
            f"checkpoint holds RNG state for {len(state.torch_cuda)} CUDA device(s), this "
            f"machine has {have}; the resumed run will not be bit-identical",
            RuntimeWarning,
            stacklevel=2,
        )
    for i, t in enumerate(state.torch_cuda[:have]):
        torch.cuda.set_rng_state(t.clone(), device=i)


class GeneratorState:
    """``state_dict()`` / ``load_state_dict()`` for a non-global generator.

    Wraps a ``numpy.random.Generator`` (the kind ``np.random.default_rng()`` returns), a
    ``random.Random`` or a ``torch.Generator``, so it can be saved as a stateful object.
    """

    def __init__(self, generator: np.random.Generator | random.Random | torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        g = self.generator
        if isinstance(g, np.random.Generator):
            return {"kind": "numpy", "state": g.bit_generator.state}
        if isinstance(g, random.Random):
            version, internal, gauss = g.getstate()
            return {"kind": "python", "state": [version, list(internal), gauss]}
        return {"kind": "torch", "state": g.get_state().clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        g, state = self.generator, state_dict["state"]
        if isinstance(g, np.random.Generator):
            g.bit_generator.state = state
        elif isinstance(g, random.Random):
            g.setstate((int(state[0]), tuple(int(x) for x in state[1]), state[2]))
        else:
            g.set_state(state.clone())
