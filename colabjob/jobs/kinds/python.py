"""``python``: the user's own training function, driving a ``Session``.

``job.entrypoint`` names it as ``package.module:function`` (imported from ``sys.path``, then
from the working directory) or ``path/to/file.py:function`` (relative to the working
directory). It is called once per segment as::

    def main(session: colabjob.jobs.session.Session, spec: colabjob.config.JobSpec) -> None:
        model, opt, loader = ...                  # build everything from spec (job.args, ...)
        session.track(model=model, optimizer=opt, loader=loader)   # restores the newest checkpoint
        for batch in session.batches():
            ...
            if session.step(loss=loss):           # True: checkpoint committed, stop now
                return

A one-parameter function gets only the session. Returning ends the segment (the job is
complete unless the session stopped it); an exception ends it as a crash. With
``training.fsdp`` (``--fsdp``) on several processes the function shards its model before
building the optimizer (``colabjob.jobs.sharding.shard_model``); ``track()`` refuses a
whole one.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.errors import ConfigError
from colabjob.jobs.session import Session

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.context import SegmentContext, SegmentOutcome

__all__ = ["load_entrypoint", "run"]


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as first:
        if first.name != name.split(".")[0] or os.getcwd() in sys.path:
            raise
        sys.path.insert(0, os.getcwd())
        return importlib.import_module(name)


def load_entrypoint(entrypoint: str) -> Callable[..., Any]:
    """The function ``module:function`` / ``file.py:function`` names."""
    target, sep, attr = entrypoint.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"job.entrypoint {entrypoint!r} is not 'module:function'")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"job.entrypoint: no file {target!r}")
            mod_spec = importlib.util.spec_from_file_location(f"colabjob_user_{path.stem}", path)
            if mod_spec is None or mod_spec.loader is None:
                raise ConfigError(f"job.entrypoint: cannot import {target!r}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = _import_module(target)
    except ImportError as e:
        raise ConfigError(
            f"job.entrypoint: cannot import {target!r}: {e}",
            hint="put the module on PYTHONPATH, run from its directory, or give path/to/file.py",
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"job.entrypoint: {target!r} has no function {attr!r}")
    return fn


def _wants_spec(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def run(spec: JobSpec, ctx: SegmentContext) -> SegmentOutcome:
    assert spec.job.entrypoint is not None
    fn = load_entrypoint(spec.job.entrypoint)
    # training.fsdp: the function shards its model (sharding.shard_model); track() checks
    session = Session(dataclasses.replace(ctx, fsdp=spec.training.fsdp))
    try:
        if _wants_spec(fn):
            fn(session, spec)
        else:
            fn(session)
    except BaseException as e:
        session.close(error=e)
        raise
    return session.close()
