"""Exact training state: copy to CPU memory, write to plain files, restore bit-identically.

Two phases keep the training loop's pause short. ``snapshot(...)`` runs on the training
thread at an optimizer-step boundary and copies everything needed to continue *exactly*
into CPU memory (detached clones): model weights (only trainable tensors plus buffers when
part of the model is frozen, e.g. LoRA), optimizer, LR scheduler, AMP grad scaler, the
global RNGs, the data loader position and its batch ``Geometry``, ``Counters``, a metrics
history and any extra object with ``state_dict()`` / ``load_state_dict()``.
``write_snapshot(snapshot, directory)`` writes files and may run on a background thread.
``restore(directory, ...)`` validates and reads every file first, then loads the objects
and sets the RNGs last. No storage layer here: the session layer uploads the directory.

Files (``FILES``): ``model.safetensors`` (weights; tied tensors stored once),
``optimizer.safetensors`` (optimizer, scheduler and scaler state: tensors, plus the rest as
JSON in its metadata; older checkpoints' ``optimizer.pt`` is read only with
``torch.load(weights_only=True)``, so a planted pickle raises ``UnsafeCheckpointError``),
``state.safetensors`` (RNG tensors and tensors from loader/extra states),
``metrics.json`` and, written last, ``state.json`` (format, counters, geometry, RNG of
Python and NumPy, loader and extra states, user meta, library versions). A multi-process
snapshot adds, for every rank but 0, that rank's RNGs and loader position (``ranks``;
rank 0's are the top-level ones, so a single process reads it like any other).

Where each part lives (this module re-exports the public names): the file names and the
records (``Counters``, ``Snapshot``, ``RankState``, ``Restored``, ``Stateful``) in
``colabjob.jobs.state_format``; ``snapshot`` and ``write_snapshot`` in
``colabjob.jobs.state_capture``; ``restore`` in ``colabjob.jobs.state_restore``.
"""

from __future__ import annotations

from colabjob.jobs.formats import safe_torch_load
from colabjob.jobs.state_capture import snapshot, write_snapshot
from colabjob.jobs.state_format import FILES, Counters, RankState, Restored, Snapshot, Stateful
from colabjob.jobs.state_format import FORMAT as FORMAT
from colabjob.jobs.state_format import METRICS_FILE as METRICS_FILE
from colabjob.jobs.state_format import MODEL_FILE as MODEL_FILE
from colabjob.jobs.state_format import OPTIMIZER_FILE as OPTIMIZER_FILE
from colabjob.jobs.state_format import OPTIMIZER_TENSORS_FILE as OPTIMIZER_TENSORS_FILE
from colabjob.jobs.state_format import STATE_FILE as STATE_FILE
from colabjob.jobs.state_format import TENSORS_FILE as TENSORS_FILE
from colabjob.jobs.state_restore import restore

__all__ = [
    "FILES",
    "Counters",
    "RankState",
    "Restored",
    "Snapshot",
    "Stateful",
    "restore",
    "safe_torch_load",
    "snapshot",
    "write_snapshot",
]
