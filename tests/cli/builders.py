"""Jobs in any state, built directly with ``colabjob.runner.record`` and the checkpoint
store (no training), for the status/ls/logs/plot tests; and helpers to run the CLI in a
subprocess the way a user does (non-TTY: plain output) or in-process (fast, same outputs)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from colabjob.jobs.policy import StopReason
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import Holder
from colabjob.runner.record import Segment, create_record, update_record
from colabjob.runner.states import JobEvent
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import Store, open_store

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0

CONFIG: dict[str, Any] = {
    "job": {"name": "j", "kind": "python", "entrypoint": "train:main"},
    "training": {"max_steps": 100},
    "budget": {"platform": "colab", "limit": "1h", "margin": "5m"},
}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    """``colabjob ARGS`` in a subprocess (stdout/stderr captured: not a TTY)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("NO_COLOR", None)
    full_env.pop("CI", None)
    return subprocess.run(
        [sys.executable, "-m", "colabjob.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    """``colabjob.cli.main(ARGS)`` in this process, its stdout/stderr captured (not a TTY),
    reported like ``run_cli``; argparse's usage exit (``SystemExit``) becomes the returncode."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        from colabjob.cli import main

        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def metric_rows(first: int, last: int) -> list[dict[str, Any]]:
    return [
        {"step": s, "epoch": 0, "samples": 8 * s, "loss": 5.0 / (1 + s), "lr": 1e-3}
        for s in range(first, last + 1)
    ]


def save_checkpoint(
    store: Store, step: int, rows: list[dict[str, Any]], *, epoch: int = 1, keep: int = 2
) -> None:
    CheckpointStore(store, keep=keep).save(
        step,
        {"model.safetensors": b"w" * 64, "metrics.json": json.dumps(rows).encode()},
        epoch=epoch,
    )


def make_job(
    root: Path,
    name: str,
    *,
    segments: list[tuple[int, int, StopReason | None]],
    final: JobEvent | None = None,
    checkpoint: bool = True,
    config: dict[str, Any] | None = None,
) -> Store:
    """A job whose history holds ``segments`` ``(first, last, reason)`` of 100 s each; a
    reason of None leaves the last one open (RUNNING). ``final`` applies one more event
    (e.g. CANCEL). A checkpoint with the metrics up to the last step is committed."""
    store = open_store(root / name)
    create_record(store, job_id=name, config=config or CONFIG)
    t = T0
    for i, (first, last, reason) in enumerate(segments):
        seg = Segment(
            session_id=f"s{i}",
            platform="colab",
            host="vm",
            started_at=t,
            first_step=first,
            epoch=i + 1,
        )

        def begin(r: Any, seg: Segment = seg) -> Any:
            r = r.apply(JobEvent.START if r.state.value == "created" else JobEvent.RESUME)
            return r.begin_segment(seg)

        update_record(store, begin)
        t += 100.0
        if reason is None:
            continue
        event = {
            StopReason.COMPLETED: JobEvent.COMPLETE,
            StopReason.CRASH: JobEvent.FAIL,
        }.get(reason, JobEvent.SUSPEND)

        def end(
            r: Any, last: int = last, reason: StopReason = reason, e: JobEvent = event, t: float = t
        ) -> Any:
            err = "RuntimeError: boom" if reason is StopReason.CRASH else None
            return r.end_segment(ended_at=t, last_step=last, stop_reason=reason, error=err).apply(e)

        update_record(store, end)
    if final is not None:
        update_record(store, lambda r: r.apply(final))
    if checkpoint and segments:
        last_step = max(s[1] for s in segments)
        save_checkpoint(store, last_step, metric_rows(1, last_step))
    return store


def hold_lease(store: Store, step: int) -> Lease:
    """A live runner's lease (fresh heartbeat, status with its step)."""
    lease = Lease(store, holder=Holder(host="vm", platform="colab", pid=4242, session_id="live"))
    lease.acquire()
    lease.renew({"step": step})
    return lease


_TRAIN_HEAD = """
import os, signal, time
import torch
from colabjob.jobs.data import make_loader


def main(session, spec):
    args = spec.job.args
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.OPTIMIZER(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    session.track(model=model, optimizer=opt, loader=make_loader(data, batch_size=4, seed=0))
    for x, y in session.batches():
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if session.step(loss=loss):
            return
"""


def tiny_train_script(after_step: str, *, optimizer: str = "SGD") -> str:
    """The source of a ``python``-kind job script: a linear model on 32 fixed samples, exact
    across resumes; ``after_step`` (the loop body after each step, which may read
    ``args = spec.job.args``) is where a test pauses, saves or kills the run."""
    body = textwrap.indent(textwrap.dedent(after_step).strip("\n") + "\n", " " * 8)
    return _TRAIN_HEAD.replace("OPTIMIZER", optimizer) + body
