"""Driver of the sharded crash test: 2-rank FSDP groups, one rank SIGKILLed at a file event.

    python -m tests.jobs.sharded_crash_child ROOT OUT.json

One run is a fresh job at ``ROOT/<name>`` trained by 2 forked rank processes (gloo on
127.0.0.1, ``fsdp_child.build``'s sharded model): ``save(final=True)`` at step 2 (the
previous checkpoint), then the counted save at step 4. During that save a rank counts its
file events: opening a file for writing (a DCP shard, ``.metadata``, a staged file, a
checkpoint file's or the manifest's temp file), ``fsync``, ``rename``/``replace``/``link``,
``unlink``/``remove``/``rmdir``/``rmtree``; it sends itself SIGKILL just before event
``kill_at`` and the driver then SIGKILLs the other rank (the machine is gone). First a
whole run records every rank's events (``[fn, path, destination of a rename]``); then one
run per kind of event (``kill_points``), and two runs whose event raises ``OSError``
instead, at every try (``fail_points``: the ranks go on and save again at step 5). Each
run's local temp files go to ``ROOT/<name>-staging``. Forking one driver that imported
torch once keeps a run to about a second. ``OUT.json``: per run, its plan entry, the
ranks' exit statuses and, for the whole run, the events (for a failing run, what failed).
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from colabjob.jobs.distributed import init_distributed
from colabjob.jobs.session import Session
from colabjob.runner.ranks import free_port
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.retry import RetryPolicy

from .dist_child import segment_context
from .fsdp_child import build

_OS_EVENTS = ("fsync", "replace", "rename", "link", "unlink", "remove", "rmdir")
_WRITE_MODES = ("w", "a", "x", "+")


class Events:
    """Counts this process's file events; SIGKILL just before event ``kill_at``."""

    def __init__(self, kill_at: int | None, *, fail: bool = False) -> None:
        self.kill_at = kill_at
        self.fail = fail  # raise OSError at event kill_at (and at every later call of the
        self.failing: str | None = None  # same function: a retry fails too) instead of dying
        self.seen: list[tuple[str, str, str]] = []
        self.on = False

    def tick(self, fn: str, path: Any, dest: Any = "") -> None:
        if not self.on:
            return
        self.seen.append((fn, _path(path), _path(dest)))
        if len(self.seen) == self.kill_at or fn == self.failing:
            if self.fail:
                self.failing = fn
                raise OSError(errno.EIO, "injected I/O error", _path(path))
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                self.tick(name, *args[:2])
                return real(*args, **kwargs)

            return call

        for name in _OS_EVENTS:
            setattr(os, name, counted(name, getattr(os, name)))
        shutil.rmtree = counted("rmtree", shutil.rmtree)  # type: ignore[assignment]
        real_open, real_fdopen = builtins.open, os.fdopen

        def opened(real: Callable[..., Any], name: str) -> Callable[..., Any]:
            def call(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
                if any(m in str(mode) for m in _WRITE_MODES):
                    self.tick(name, file)
                return real(file, mode, *args, **kwargs)

            return call

        builtins.open = opened(real_open, "open")
        os.fdopen = opened(real_fdopen, "open")


def _path(x: Any) -> str:
    if isinstance(x, int):  # a file descriptor (fsync, fdopen)
        try:
            return os.readlink(f"/proc/self/fd/{x}")
        except OSError:
            return f"fd {x}"
    return os.fspath(x) if isinstance(x, str | os.PathLike) else str(x)


def rank_main(store: Path, staging: Path, events: Events, out: Path) -> None:
    """One rank of one run (in a forked process with the rank's environment)."""
    torch.set_num_threads(1)
    staging.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(staging)  # this run's local temp files, kept apart from others'
    init_distributed()
    ctx, _ = segment_context(store, total=10, stop_at=None, allow_geometry_change=False)
    st = open_store(store, retry=RetryPolicy(sleep=lambda _: None))  # retries, no waits
    ctx = dataclasses.replace(
        ctx, store=st, checkpoints=CheckpointStore(st), every_steps=None, staging_dir=staging
    )
    o = build(init_seed=3, batch_size=2, grad_accum=1, total=10)
    s = Session(ctx)
    s.track(**o)
    model, opt = o["model"], o["optimizer"]
    failed = None
    for batch in s.batches():
        loss = torch.nn.functional.cross_entropy(model(batch["x"].float()), batch["y"].long())
        loss.backward()
        opt.step()
        o["scheduler"].step()
        opt.zero_grad(set_to_none=True)
        s.step(loss=loss.item())
        if s.global_step == 2:
            s.save(final=True)
        if s.global_step == 4:
            events.on = True
            try:
                s.save(final=True)
            except (Exception, CheckpointException) as e:  # injected (Events.fail)
                failed = f"{type(e).__name__}: {e}"  # DCP's exception is a BaseException
            events.on = False
            if failed is None:
                out.write_text(json.dumps(events.seen))
                return
        if s.global_step == 5:  # after a failed save: the next one commits
            s.save(final=True)
            out.write_text(json.dumps({"failed": failed}))
            return


def one_run(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Fork the 2 ranks of one run; when one dies by SIGKILL, SIGKILL the other."""
    store, staging = root / entry["name"], root / f"{entry['name']}-staging"
    port = free_port()
    pids: dict[int, int] = {}
    for rank in (0, 1):
        pid = os.fork()
        if pid == 0:  # the rank
            code = 1
            try:
                os.environ.update(
                    RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                )
                mine = entry["rank"] in (rank, None)
                events = Events(entry["kill_at"] if mine else None, fail=entry.get("fail", False))
                if mine:
                    events.install()
                rank_main(store, staging, events, root / f"{entry['name']}.rank{rank}.json")
                code = 0
            except BaseException as e:  # a rank left behind by a killed one
                print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        pids[pid] = rank
    status: dict[int, int] = {}
    while pids:
        pid, raw = os.wait()
        rank = pids.pop(pid)
        status[rank] = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
        if status[rank] == -signal.SIGKILL:
            for other in pids:
                os.kill(other, signal.SIGKILL)
    got: dict[str, Any] = {**entry, "status": [status[0], status[1]]}
    if entry["kill_at"] is None or entry.get("fail"):
        got["events"] = [json.loads((root / f"{entry['name']}.rank{r}.json").read_text())
                         for r in (0, 1)]
    return got


# what fully_shard, DCP and the local store import on first use: imported once, before the
# forks, instead of in every rank of every run (seconds each)
_WARM = ("torch._dynamo", "torch.onnx", "fsspec.implementations.local", "colabjob.storage.local")


def label(event: list[str], finals: dict[str, str], store: Path) -> str:
    """An event's kind: its function, where it lands (the store or local staging) and what
    the file is once in place (a temp file is named by what it is renamed or linked to)."""
    fn, path, dest = event
    final = Path(finals.get(path) or dest or path)
    where = "store" if Path(path).is_relative_to(store) else "staging"
    name = final.name
    if name.endswith(".distcp"):
        what = "shard"
    elif name.startswith(".metadata"):
        what = "metadata"
    elif name == "manifest.json":
        what = "manifest"
    elif fn in ("unlink", "remove", "rmdir", "rmtree"):
        what = "cleanup"
    elif fn == "fsync" and not final.suffix:
        what = "directory"
    else:
        what = "file"
    return f"{fn} {where} {what}"


def kill_points(root: Path, recorded: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per rank and event kind: killed just before that kind's first event."""
    store = root / recorded["name"]
    plan = []
    for rank, events in enumerate(recorded["events"]):
        finals = {e[1]: e[2] for e in events if e[0] in ("rename", "replace", "link")}
        seen: set[str] = set()
        for i, event in enumerate(events):
            kind = label(event, finals, store)
            if kind not in seen:
                seen.add(kind)
                plan.append({"name": f"r{rank}k{i + 1}", "rank": rank, "kill_at": i + 1,
                             "event": kind, "path": event[1]})
    return plan


# failed (not killed) saves: an I/O error at the first event of these kinds
FAILURES = {"fail-shard": (1, "open store shard"), "fail-manifest": (0, "link store manifest")}


def fail_points(root: Path, recorded: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per ``FAILURES`` entry: that rank's event raises ``OSError`` instead."""
    kinds = {(e["rank"], e["event"]): e["kill_at"] for e in kill_points(root, recorded)}
    return [
        {"name": name, "rank": rank, "kill_at": kinds[rank, kind], "event": kind, "fail": True}
        for name, (rank, kind) in FAILURES.items()
    ]


def main(argv: list[str]) -> int:
    """ROOT OUT.json: a recording run, then one run per kill point (``kill_points``) and
    per injected failure (``fail_points``)."""
    root, out = Path(argv[0]), Path(argv[1])
    for name in _WARM:
        importlib.import_module(name)
    recorded = one_run(root, {"name": "whole", "rank": None, "kill_at": None})
    plan = kill_points(root, recorded) + fail_points(root, recorded)
    results = [recorded] + [one_run(root, entry) for entry in plan]
    out.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
