"""A long run for the ``colabjob stop`` test: ``colabjob.session()`` on local storage with a
fake clock (each step "takes" 0.25 s of it), 10,000 steps, no interval checkpoints, the
stop-request poller thread slowed to an hour (so only the step-boundary check can see the
request).

    python -m tests.cli.stop_child JOB_URL DIR

At step 5 it writes ``DIR/ready`` and waits (really) until the test has run ``colabjob stop``
and written ``DIR/asked``; then it trains on. It writes ``DIR/result.json``: the step at which
the request was made and the outcome.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import colabjob
from tests.fakes import FakeClock
from tests.jobs.helpers import train_tiny


def main(argv: list[str]) -> int:
    url, d = argv[0], Path(argv[1])
    clock = FakeClock(start=time.time())  # the lease looks live to `colabjob stop`
    asked: list[int] = []

    def after(s: Any) -> None:
        if s.global_step == 5 and not asked:
            (d / "ready").write_text("1")
            for _ in range(24000):  # a bound, not a deadline: the test answers in seconds
                if (d / "asked").exists():
                    break
                time.sleep(0.01)
            asked.append(s.global_step)

    with colabjob.session(url, clock=clock, platform="local", log=None, every_minutes=None,
                          stop_poll_seconds=3600, max_steps=10_000) as s:  # fmt: skip
        train_tiny(s, clock=clock, step_seconds=0.25, after=after)
    result = {"asked_at": asked[0] if asked else None, **dataclasses.asdict(s.outcome)}
    (d / "result.json").write_text(json.dumps(result))
    return 0 if s.outcome.completed else 75


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
