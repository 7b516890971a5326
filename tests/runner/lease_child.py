"""Child processes for the lease tests (real processes racing for, or holding, one job).

``race(url, index, barrier, results)`` is a ``multiprocessing`` target: wait for the others,
try to acquire, report. ``python -m tests.runner.lease_child hold URL`` acquires the lease and
then obeys one command per stdin line (``beat``, ``commit STEP``, ``quit``), printing one
result line each, so the parent can freeze it (SIGSTOP) at a known point.
"""

from __future__ import annotations

import sys
from typing import Any

from colabjob.errors import LeaseHeldError, StaleEpochError
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import Holder
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore


def race(url: str, index: int, barrier: Any, results: Any) -> None:
    lease = Lease(open_store(url), holder=Holder.here(session_id=f"racer{index}"), ttl=60)
    barrier.wait(30)
    try:
        info = lease.acquire()
        results.put(("won", index, info.epoch))
    except LeaseHeldError as e:
        results.put(("held", index, str(e)))
    except Exception as e:  # report, so the parent's assertion says what happened
        results.put(("error", index, repr(e)))


def hold(url: str) -> None:
    store = open_store(url)
    lease = Lease(store, holder=Holder.here(platform="test", session_id="holder"), ttl=30)
    lease.acquire()
    print(f"acquired {lease.epoch}", flush=True)
    ckpts = CheckpointStore(store, fence=lease.current_epoch)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "beat":
            try:
                lease.renew()
                print("renewed", flush=True)
            except LeaseHeldError as e:
                print(f"lost {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
        elif cmd == "commit":
            try:
                ckpts.save(int(args[0]), {"weights": b"late"}, epoch=lease.epoch)
                print("committed", flush=True)
            except StaleEpochError as e:
                print(f"fenced {str(e).splitlines()[0]}", flush=True)
        elif cmd == "quit":
            return


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        hold(sys.argv[2])
