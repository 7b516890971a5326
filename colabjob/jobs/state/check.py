"""Whether a checkpoint directory can be loaded, found out before anything is loaded from it.

``restore()`` (``colabjob.jobs.state.restore``) already reads every file before it changes an
object, so the Session can hand it a checkpoint and fall back on a refusal. A caller that
loads a checkpoint in several phases cannot: the HF Trainer integration gives the Trainer the
checkpoint's step counter before the weights are read and the optimizer, loader and RNGs
only once training has started. ``check_loadable(directory)`` lets such a caller refuse a
checkpoint while nothing has changed yet: it reads and decodes every file a restore of any
slot would (``state.json``, every tensor of the weights file, the optimizer state through
``read_optimizer_state``, the tensors file, the data position, RNG and extra states of the
given rank, the metrics) and raises ``CorruptCheckpointError`` or ``UnsafeCheckpointError``
as a restore would. It changes nothing, keeps at most one file's tensors in memory at a time
(the weights one tensor at a time) and frees them before it returns. Whether the content
fits the live model (keys, shapes, batch geometry) is not its business: that is a changed
job, which ``restore()`` refuses with its own errors, not a damaged checkpoint.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from colabjob.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from colabjob.jobs.data.geometry import Geometry
from colabjob.jobs.state.codec import decode, read_json, read_tensors
from colabjob.jobs.state.format import (
    FORMAT,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    TENSORS_FILE,
    Counters,
)
from colabjob.jobs.state.restore import read_optimizer_state
from colabjob.jobs.state.rng import RngState
from colabjob.jobs.state.tensorfile import TensorFile

__all__ = ["check_loadable"]

# What a malformed part of state.json raises while it is decoded (a missing key, a wrong
# type, bad base64 or NumPy layout, a marker naming no tensor).
_DECODE_ERRORS = (CheckpointError, KeyError, TypeError, ValueError, IndexError, binascii.Error)


def check_loadable(
    directory: str | os.PathLike[str], *, rank: int = 0, json_files: Iterable[str] = ()
) -> None:
    """Raise ``CorruptCheckpointError``/``UnsafeCheckpointError`` if the checkpoint in
    ``directory`` would not load (see the module docstring); ``rank``: the process whose
    RNGs and data position are checked; ``json_files``: other files (present ones) that
    must parse as JSON, such as the HF ``trainer_state.json``."""
    root = Path(directory)
    doc = read_json(root / STATE_FILE)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{STATE_FILE} is not a {FORMAT} document")
    _parsed("counters", lambda: Counters.from_dict(doc["counters"]))
    if doc.get("geometry"):
        _parsed("geometry", lambda: Geometry.from_dict(doc["geometry"]))
    if doc.get("model") is not None:
        model = doc["model"]
        _parsed("model entry", lambda: (dict(model["aliases"]), bool(model["trainable_only"])))
        _read_every_tensor(root / MODEL_FILE)
    if doc.get("optimizer") is not None:
        state = read_optimizer_state(root)
        if not isinstance(state, dict):
            raise CorruptCheckpointError("the optimizer state is not a dict")
        del state  # one file's tensors at a time
    _parsed("rank state", lambda: _rank_states(root, doc, rank))
    for name in (METRICS_FILE, *json_files):
        if (root / name).exists():
            read_json(root / name)


def _read_every_tensor(path: Path) -> None:
    """Every tensor of a safetensors file read (and dropped) one at a time: a header that
    does not parse or a short file is ``CorruptCheckpointError`` from ``TensorFile``."""
    with TensorFile(path) as f:
        for key in f.entries:
            f.get(key)


def _rank_states(root: Path, doc: dict[str, Any], rank: int) -> None:
    """Decode what ``restore()`` decodes for ``rank``: data position, RNGs, extras (their
    tensors file is read here and dropped on return)."""
    tensors = read_tensors(root / TENSORS_FILE) if (root / TENSORS_FILE).exists() else {}
    rng_doc, prefix, data_doc = doc.get("rng"), "rng/", doc.get("data")
    entry = (doc.get("ranks") or {}).get(str(rank)) if rank else None
    if entry is not None:
        rng_doc, prefix, data_doc = entry["rng"], f"ranks/{rank}/rng/", entry["data"]
    decode(data_doc, tensors)
    for tree in (doc.get("extras") or {}).values():
        decode(tree, tensors)
    if rng_doc is not None:
        cut = len(prefix)
        rng = {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix)}
        RngState.from_parts(rng_doc, rng)


def _parsed(what: str, read: Callable[[], Any]) -> None:
    try:
        read()
    except (CorruptCheckpointError, UnsafeCheckpointError):
        raise
    except _DECODE_ERRORS as e:
        raise CorruptCheckpointError(f"{STATE_FILE}: its {what} does not decode ({e!r})") from e
