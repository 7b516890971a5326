"""A stand-in training child for the supervisor tests: speaks the child protocol
(``child REQUEST RESULT``) and plays a scripted action per attempt against a real job record
and lease, without torch (so each attempt starts in a fraction of a second).

``request.spec``: ``{"dir": tmpdir, "script": ["kill", "ok", ...]}``; attempt N plays
``script[N]`` (the last one repeats). Actions: ``ok`` (segment completes), ``pause`` (segment
stops for the budget), ``kill`` (SIGKILL mid-segment), ``raise`` (RuntimeError mid-segment,
closed as FAILED like ``run_segment`` does), ``usage`` (ConfigError before anything),
``import`` (ImportError), ``exit3`` (exit status 3, no result), ``wait_signal`` (wait for
SIGTERM, then stop like the watchdog: SUSPENDED, exit 75).

``drive REQUEST``: run a ``Supervisor`` over this module (for the signal-forwarding test,
which must signal a supervisor that is not pytest itself); prints its exit code.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from colabjob.errors import ConfigError
from colabjob.jobs.context import SegmentOutcome
from colabjob.jobs.policy import StopReason
from colabjob.runner.child_protocol import RunRequest, child_main
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import Holder
from colabjob.runner.record import Segment, create_record, read_record, update_record
from colabjob.runner.states import JobEvent, JobState
from colabjob.runner.supervisor import Supervisor
from colabjob.storage.store import open_store


def _attempt(d: Path) -> int:
    counter = d / "attempts"
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    return n


def _begin(request: RunRequest) -> tuple[Any, Lease, int]:
    store = open_store(request.url)
    if read_record(store) is None:
        create_record(store, job_id="fake", config={"training": {"max_steps": 10}})
    lease = Lease(store, holder=Holder.here(platform="local", session_id=request.session_id))
    lease.acquire()
    first = 3 * (int(Path(request.spec["dir"], "attempts").read_text()) - 1)

    def begin(r: Any) -> Any:
        r = r.apply(JobEvent.START if r.state is JobState.CREATED else JobEvent.RESUME)
        seg = Segment(
            session_id=request.session_id,
            platform="local",
            host=lease.holder.host,
            started_at=0.0,
            first_step=first,
            epoch=lease.epoch,
        )
        return r.begin_segment(seg)

    update_record(store, begin)
    return store, lease, first


def _end(store: Any, lease: Lease, reason: StopReason, last: int, event: JobEvent) -> None:
    update_record(
        store,
        lambda r: r.end_segment(ended_at=1.0, last_step=last, stop_reason=reason).apply(event),
    )
    lease.release()


def play(request: RunRequest, _progress: object = None) -> SegmentOutcome:
    d = Path(request.spec["dir"])
    n = _attempt(d)
    script = request.spec["script"]
    action = script[min(n, len(script) - 1)]
    if action == "usage":
        raise ConfigError("bad spec: training.lr must be > 0", hint="fix the spec")
    if action == "import":
        raise ImportError("No module named 'my_train'")
    store, lease, first = _begin(request)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "exit3":
        os._exit(3)
    if action == "raise":
        _end(store, lease, StopReason.CRASH, first, JobEvent.FAIL)
        raise RuntimeError("CUDA out of memory (simulated)")
    if action == "wait_signal":
        got = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: got.set())
        (d / "ready").write_text("1")
        got.wait(60)
        _end(store, lease, StopReason.SIGNAL, first + 1, JobEvent.SUSPEND)
        return SegmentOutcome(
            stop_reason="signal",
            first_step=first,
            last_step=first + 1,
            completed=False,
            checkpoint_step=first + 1,
        )
    if action == "pause":
        _end(store, lease, StopReason.BUDGET, first + 2, JobEvent.SUSPEND)
        return SegmentOutcome(
            stop_reason="budget",
            first_step=first,
            last_step=first + 2,
            completed=False,
            checkpoint_step=first + 2,
        )
    assert action == "ok", action
    _end(store, lease, StopReason.COMPLETED, 10, JobEvent.COMPLETE)
    return SegmentOutcome(
        stop_reason="completed",
        first_step=first,
        last_step=10,
        completed=True,
        checkpoint_step=10,
    )


def main(argv: list[str]) -> int:
    if argv and argv[0] == "drive":
        request = RunRequest.from_json(Path(argv[1]).read_text())
        result = Supervisor(
            request, retries=2, backoff=0.0, child_module="tests.runner.supervisor_child"
        ).run()
        print(f"exit={result.exit_code} attempts={result.attempts}", flush=True)
        return result.exit_code
    return child_main(argv, runner=play)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
