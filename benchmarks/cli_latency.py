"""How long `colabjob status` and `colabjob ls` take, as a user runs them, next to the
start-up of a bare Python (`python -c pass`) measured in the same run.

Builds a storage root on local disk with a few jobs (a record with segments, a lease, two
committed checkpoints with a metrics history each), then times each command as a fresh
process, several times, and reports medians. Last line: one JSON object.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = 9
JOBS = 5


def build(root: Path) -> Path:
    from colabjob.jobs.policy import StopReason
    from colabjob.runner.lease.claim import Lease
    from colabjob.runner.lease.info import Holder
    from colabjob.runner.record import Segment, create_record, update_record
    from colabjob.runner.states import JobEvent
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.store import open_store

    config = {
        "job": {"name": "bench", "kind": "scratch"},
        "training": {"max_steps": 10_000},
        "budget": {"platform": "colab"},
    }
    for j in range(JOBS):
        store = open_store(root / f"job{j}")
        create_record(store, job_id=f"job{j}", config=config)
        for i in range(3):
            seg = Segment(session_id=f"s{i}", platform="colab", host="vm", started_at=1e9 + i)

            def begin(r, seg=seg):  # type: ignore[no-untyped-def]
                ev = JobEvent.START if r.state.value == "created" else JobEvent.RESUME
                return r.apply(ev).begin_segment(seg)

            update_record(store, begin)
            update_record(
                store,
                lambda r, i=i: r.end_segment(
                    ended_at=1e9 + 3600 * (i + 1),
                    last_step=1000 * (i + 1),
                    stop_reason=StopReason.BUDGET,
                ).apply(JobEvent.SUSPEND),
            )
        rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 3001)]
        for step in (2000, 3000):
            CheckpointStore(store).save(
                step,
                {"model.safetensors": b"w" * 100_000, "metrics.json": json.dumps(rows).encode()},
            )
        lease = Lease(store, holder=Holder(host="vm", platform="colab", pid=1, session_id="x"))
        lease.acquire()
        lease.release()
    return root / "job0"


def timed(cmds: dict[str, list[str]]) -> dict[str, float]:
    """Median wall time of each command; rounds interleave them so load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(RUNS):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="colabjob-bench-") as tmp:
        job = build(Path(tmp))
        cli = [sys.executable, "-m", "colabjob.cli"]
        got = timed(
            {
                "bare": [sys.executable, "-c", "pass"],
                "status": [*cli, "status", str(job)],
                "ls": [*cli, "ls", tmp],
            }
        )
        bare, status, ls = got["bare"], got["status"], got["ls"]
    print(f"python -c pass   {bare * 1000:7.1f} ms")
    print(f"colabjob status  {status * 1000:7.1f} ms")
    print(f"colabjob ls ({JOBS}) {ls * 1000:7.1f} ms")
    print(
        json.dumps(
            {
                "bench": "cli_latency",
                "status_s": round(status, 4),
                "ls_s": round(ls, 4),
                "python_startup_s": round(bare, 4),
                "status_vs_python_startup": round(status / bare, 2),
                "ls_vs_python_startup": round(ls / bare, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
