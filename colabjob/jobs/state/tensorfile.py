"""Streaming safetensors files: write and read one tensor at a time, never the whole buffer.

``safetensors.torch.save_file``/``load_file`` hold a whole file's tensors at once; a
checkpoint of a large model must not. ``write_tensors(path, tensors, consume=...)`` writes the
safetensors layout (8-byte little-endian header length, JSON header, raw little-endian
bytes) straight from each tensor's memory, moving one tensor at a time to the CPU and, with
``consume``, dropping the caller's reference right after it is written, so a snapshot's
memory is released as the file grows. ``TensorFile`` reads the header (validated like
safetensors does: known dtypes, contiguous offsets, the file's size) and ``read_into`` fills
an existing tensor from the file with ``readinto`` (no mmap, no intermediate copy when the
target is a contiguous CPU tensor of the same dtype). Files stay loadable by
``safetensors.safe_open``/``load_file``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping, MutableMapping
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch

from colabjob.errors import CheckpointError, CorruptCheckpointError

__all__ = ["TensorFile", "tensor_nbytes", "write_tensors"]

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {code: dtype for dtype, code in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_Entry = tuple[torch.dtype, list[int], int, int]  # dtype, shape, start, end (data offsets)


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_tensors(
    path: str | os.PathLike[str],
    tensors: MutableMapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    consume: bool = False,
) -> None:
    """Write ``tensors`` (any device, any layout) as a safetensors file, one at a time.

    With ``consume`` each entry is removed from ``tensors`` once written, so the memory of
    a snapshot that only this mapping holds is freed tensor by tensor.
    """
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    # Wide dtypes first (as safetensors orders them) so every tensor stays aligned.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which safetensors lacks")
        n = tensor_nbytes(t)
        entries[key] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for key in order:
            t = tensors.pop(key) if consume else tensors[key]
            cpu = t.detach().to("cpu").contiguous()  # a copy only off-CPU or strided
            del t
            f.write(_raw(cpu))
            del cpu


class TensorFile:
    """An open safetensors file read one tensor at a time (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._f: BufferedReader = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError as e:
            raise CorruptCheckpointError(
                f"{self.path.name} is missing from {self.path.parent}"
            ) from e
        try:
            self.metadata, self.entries, self._base = self._header()
        except BaseException:
            self._f.close()
            raise

    def _bad(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path.name} is not a readable safetensors file: {why}")

    def _header(self) -> tuple[dict[str, str], dict[str, _Entry], int]:
        size = os.fstat(self._f.fileno()).st_size
        raw = self._f.read(8)
        if len(raw) < 8:
            raise self._bad("shorter than its header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise self._bad(f"header length {n} does not fit the file")
        try:
            doc = json.loads(self._f.read(n))
        except ValueError as e:
            raise self._bad(f"header is not JSON ({e})") from e
        if not isinstance(doc, dict):
            raise self._bad("header is not a JSON object")
        meta = doc.pop("__metadata__", None) or {}
        entries: dict[str, _Entry] = {}
        try:
            for key, item in doc.items():
                dtype, shape = _CODES[item["dtype"]], [int(d) for d in item["shape"]]
                start, end = (int(x) for x in item["data_offsets"])
                numel = 1
                for d in shape:
                    numel *= d
                if min(shape, default=0) < 0 or end - start != numel * dtype.itemsize:
                    raise self._bad(f"tensor {key!r}: shape and offsets disagree")
                entries[key] = (dtype, shape, start, end)
        except (KeyError, TypeError, ValueError) as e:
            raise self._bad(f"bad header entry ({e!r})") from e
        pos = 0
        for begin, stop in sorted((s, e) for _, _, s, e in entries.values()):
            if begin != pos:
                raise self._bad("tensor data is not contiguous")
            pos = stop
        if 8 + n + pos != size:
            raise self._bad(f"{size} bytes, the header describes {8 + n + pos}")
        return dict(meta), entries, 8 + n

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key][1])

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][0]

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (same shape; any dtype, device, layout) with tensor ``key``."""
        dtype, shape, start, end = self.entries[key]
        if list(out.shape) != shape:
            raise CheckpointError(
                f"tensor {key!r}: file has shape {shape}, target {list(out.shape)}"
            )
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        target = out if direct else torch.empty(shape, dtype=dtype)
        if end > start:
            self._f.seek(self._base + start)
            if self._f.readinto(_raw(target)) != end - start:
                raise self._bad(f"tensor {key!r} is truncated")
        if not direct:
            with torch.no_grad():
                out.copy_(target)
        return out

    def get(self, key: str) -> torch.Tensor:
        """A new CPU tensor holding ``key``."""
        dtype, shape, _, _ = self.entries[key]
        return self.read_into(key, torch.empty(shape, dtype=dtype))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.entries:
            yield key, self.get(key)
