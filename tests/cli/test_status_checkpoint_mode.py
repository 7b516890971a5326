"""``colabjob status`` says when a live runner saves its checkpoints synchronously (the state
does not fit twice in host memory, or ``checkpoint.async: false``), from the heartbeat's
``checkpoint_mode``; background saves, the usual case, add nothing. ``--json`` always carries
the field (None without a live runner). In-process, on jobs built directly."""

from __future__ import annotations

import json
from pathlib import Path

from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import Holder
from tests.cli.builders import make_job, run_main

WHY = "state 6.1 GB does not fit twice in host memory, 4.2 GB free"


def _running(root: Path, name: str, status: dict[str, object]) -> Path:
    store = make_job(root, name, segments=[(0, 40, None)])  # open
    lease = Lease(store, holder=Holder(host="vm", platform="colab", pid=4242, session_id="live"))
    lease.acquire()
    lease.renew({"step": 45, **status})
    return root / name


def test_status_shows_synchronous_saves_of_a_live_runner(tmp_path: Path) -> None:
    job = _running(tmp_path, "sync", {"checkpoint_mode": f"synchronous ({WHY})"})
    out = run_main("status", str(job))
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("checkpoint  "))
    assert line.startswith("checkpoint  step 40, ")
    assert line.endswith(f"; saving synchronously ({WHY})")
    s = json.loads(run_main("status", str(job), "--json").stdout)
    assert s["checkpoint_mode"] == f"synchronous ({WHY})"


def test_background_saves_and_no_live_runner_add_nothing(tmp_path: Path) -> None:
    job = _running(tmp_path, "async", {"checkpoint_mode": "background"})
    out = run_main("status", str(job))
    assert out.returncode == 0, out.stderr
    assert "checkpoint  step 40, " in out.stdout and "synchronous" not in out.stdout
    assert json.loads(run_main("status", str(job), "--json").stdout)["checkpoint_mode"] == (
        "background"
    )
    gone = make_job(tmp_path, "gone", segments=[(0, 20, None)])  # no lease
    s = json.loads(run_main("status", gone.url, "--json").stdout)
    assert s["checkpoint_mode"] is None and s["state"] == "suspended"
