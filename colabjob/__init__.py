"""colabjob: train language models across sessions that end, resuming exactly.

The public API is small and imported lazily: ``import colabjob`` loads no torch, so the
CLI's ``status`` and ``ls`` answer in well under a second. Each name below is resolved on
first access from the module that owns it.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# Exact resume on a CPU needs oneMKL's reproducible mode, read at its first call: set the
# default before any torch math runs (colabjob.jobs.numerics says why; MKL_CBWR wins).
os.environ.setdefault("MKL_CBWR", "AUTO")

# name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "ColabJobError": ("colabjob.errors", "ColabJobError"),
    "open_store": ("colabjob.storage.store", "open_store"),
    "CheckpointStore": ("colabjob.storage.checkpoints", "CheckpointStore"),
    "JobState": ("colabjob.runner.states", "JobState"),
    "watchdog": ("colabjob.notebook", "watchdog"),
    "session": ("colabjob.runner.segment", "session"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'colabjob' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
