"""File formats of the exact-state layer: a plain-data codec and safe readers/writers.

``encode(obj, prefix, tensors)`` turns a nested state (dicts, lists, tuples, scalars,
strings, bytes, NumPy arrays and scalars, tensors) into a JSON-able tree; each tensor is
put (not copied) into ``tensors`` under ``prefix/<path>`` (saved with safetensors by
``colabjob.jobs.state.tensorfile``, one at a time) and replaced by a ``{"__tensor__": key}``
marker. ``decode(tree, tensors)`` reverses it exactly, including tuples and non-string dict
keys. Nothing here can execute code on load, which is the point:
user objects' ``state_dict()`` output is restored without unpickling. The readers map
failures onto the error tree: ``safe_torch_load`` only ever calls
``torch.load(weights_only=True)`` (``UnsafeCheckpointError`` for anything that would run
code), unreadable files raise ``CorruptCheckpointError``. Writers replace files atomically.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colabjob.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from colabjob.jobs.state.tensorfile import TensorFile

__all__ = [
    "atomic_write",
    "decode",
    "deep_cpu_copy",
    "encode",
    "read_json",
    "read_tensors",
    "safe_torch_load",
    "write_json",
]

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_BYTES, _NDARRAY = "__bytes__", "__ndarray__"
_MARKERS = {_TENSOR, _TUPLE, _ITEMS, _BYTES, _NDARRAY}


def deep_cpu_copy(obj: Any) -> Any:
    """A copy of a nested state whose tensors are detached CPU clones sharing nothing."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, deep_cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [deep_cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(deep_cpu_copy(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return obj  # immutable scalars and strings; anything else is rejected by encode()


def encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj``; tensors go to ``tensors`` under keys starting ``prefix``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach()  # the writer moves it to the CPU, one tensor at a time
        return {_TENSOR: key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        data = base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode()
        return {_NDARRAY: {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": data}}
    if isinstance(obj, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, prefix, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, prefix, tensors) for v in obj]
    if isinstance(obj, dict):
        tagged = len(obj) == 1 and set(obj) <= _MARKERS
        if all(isinstance(k, str) for k in obj) and not tagged:
            return {k: encode(v, prefix, tensors) for k, v in obj.items()}
        items = [[encode(k, prefix, tensors), encode(v, prefix, tensors)] for k, v in obj.items()]
        return {_ITEMS: items}
    raise CheckpointError(
        f"cannot save a {type(obj).__name__} found in a state_dict under {prefix!r}",
        hint="make state_dict() return tensors, numbers, strings, bytes, lists, tuples, dicts",
    )


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode``."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        ((tag, body),) = tree.items()
        if tag == _TENSOR:
            if body not in tensors:
                raise CheckpointError(f"tensor {body!r} missing from the checkpoint's tensor file")
            return tensors[body]
        if tag == _TUPLE:
            return tuple(decode(v, tensors) for v in body)
        if tag == _ITEMS:
            return {decode(k, tensors): decode(v, tensors) for k, v in body}
        if tag == _BYTES:
            return base64.b64decode(body)
        if tag == _NDARRAY:
            raw = base64.b64decode(body["data"])
            return np.frombuffer(raw, dtype=np.dtype(body["dtype"])).reshape(body["shape"]).copy()
    return {k: decode(v, tensors) for k, v in tree.items()}


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temp_path)`` then rename over ``path``: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj: Any) -> Path:
    def write(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(obj, f, separators=(",", ":"))

    try:
        return atomic_write(path, write)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: not JSON-serialisable: {e}") from e


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{path} is missing", hint="is this a colabjob checkpoint directory?"
        ) from e
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path.name} is not valid JSON: {e}") from e


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read one at a time (``TensorFile``)."""
    with TensorFile(path) as f:
        return dict(f.items())


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    if not path.exists():
        raise CorruptCheckpointError(f"{path.name} is missing from {path.parent}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path.name} would need to unpickle arbitrary Python objects; refused to load it",
            hint="it was not written by colabjob or was tampered with; resume from another "
            "checkpoint",
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(f"{path.name} is unreadable: {e}") from e
