"""The lease after things went wrong: a holder SIGKILLed on this machine (taken over at once),
one on another machine (today's TTL rules), a damaged lease file (bounds, exit 2, a watch
capped at our TTL), and a job whose storage vanished under its holder (``StorageLostError``)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from colabjob.errors import (
    InvalidLeaseError,
    LeaseHeldError,
    StaleEpochError,
    StorageLostError,
)
from colabjob.runner.lease.claim import Lease
from colabjob.runner.lease.info import LEASE_KEY, Holder, LeaseObserver, process_start, read_lease
from colabjob.runner.record import RECORD_KEY, create_record, load_record
from colabjob.storage import Store, open_store
from colabjob.storage.checkpoints import CheckpointStore
from tests.fakes import FakeClock

TTL = 60.0


@pytest.fixture
def store() -> Store:
    s = open_store(f"memory://{uuid.uuid4().hex}")
    create_record(s, job_id="j", config={})
    return s


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def here(session: str, **changes: Any) -> Holder:
    return dataclasses.replace(Holder.here(session_id=session), **changes)


def runner(store: Store, clock: FakeClock, holder: Holder) -> Lease:
    return Lease(store, holder=holder, ttl=TTL, clock=clock, poll_seconds=5.0)


def write_lease(store: Store, **fields: Any) -> None:
    lease: dict[str, Any] = {
        "holder": {"host": "vm2", "platform": "colab", "pid": 7, "session_id": "x"},
        "epoch": 3,
        "ttl": 120.0,
        "acquired_at": 1_700_000_000.0,
        "heartbeat_at": 1_700_000_000.0,
    }
    lease.update(fields)
    store.write_bytes(LEASE_KEY, json.dumps(lease).encode())


def test_holder_records_its_machine_and_process_start() -> None:
    h = Holder.here(session_id="s")
    assert h.pid == os.getpid() and h.start_time == process_start(os.getpid()) and h.start_time
    assert h.boot_id and h.pid_ns and h.same_machine() and not h.gone()


@pytest.mark.parametrize(
    "how", ["pid exited", "pid reused by another process"], ids=["dead", "reused"]
)
def test_a_dead_holder_on_this_machine_is_taken_over_at_once_and_fenced(
    store: Store, how: str
) -> None:
    clock = FakeClock()
    me = Holder.here(session_id="old")
    if how == "pid exited":
        old = dataclasses.replace(me, pid=dead_pid())
    else:  # our own pid, but the holder started at another time
        old = dataclasses.replace(me, start_time=me.start_time + 1)
    zombie = runner(store, clock, old)
    assert zombie.acquire().epoch == 1

    new = runner(store, clock, here("new"))
    info = new.acquire()  # no --force, no wait
    assert info.epoch == 2 and clock.slept == [] and new.took_over == old
    assert load_record(store).epoch == 2
    with pytest.raises(StaleEpochError):  # the dead runner's late commit is fenced out
        CheckpointStore(store, fence=zombie.current_epoch).save(1, {"w": b"x"}, epoch=1)


def test_a_live_holder_on_this_machine_is_refused(store: Store) -> None:
    clock = FakeClock()
    runner(store, clock, here("alive")).acquire()  # this very process: alive
    with pytest.raises(LeaseHeldError) as e:
        runner(store, clock, here("second")).acquire()
    assert "already running on" in str(e.value) and clock.slept == []


@pytest.mark.parametrize("change", ["host", "boot_id", "pid_ns", "old lease"])
def test_a_holder_elsewhere_keeps_the_ttl_rules(store: Store, change: str) -> None:
    clock = FakeClock()
    me = dataclasses.replace(Holder.here(session_id="gone"), pid=dead_pid())
    other = {
        "host": dataclasses.replace(me, host="another-vm"),
        "boot_id": dataclasses.replace(me, boot_id="0" * 36),
        "pid_ns": dataclasses.replace(me, pid_ns="pid:[1]"),
        "old lease": dataclasses.replace(me, boot_id="", pid_ns="", start_time=0),
    }[change]
    runner(store, clock, other).acquire()
    with pytest.raises(LeaseHeldError):
        runner(store, clock, here("new")).acquire()
    forced = runner(store, clock, here("forced"))
    assert forced.acquire(force=True).epoch == 2  # only after watching it for the TTL
    assert sum(clock.slept) == TTL and forced.took_over is None


def test_a_lease_of_an_older_version_still_reads(store: Store) -> None:
    write_lease(store)
    got = read_lease(store)
    assert got is not None and got[0].holder.boot_id == "" and got[0].holder.start_time == 0
    assert not got[0].holder.gone()


@pytest.mark.parametrize(
    "fields",
    [
        {"heartbeat_at": 1e300},
        {"acquired_at": float("nan")},
        {"ttl": 1e12},
        {"ttl": -1},
        {"epoch": "3"},
        {"holder": {"host": "vm", "platform": "x", "pid": -5, "session_id": "s"}},
        {"status": [1, 2]},
    ],
    ids=["huge-heartbeat", "nan-time", "huge-ttl", "negative-ttl", "string-epoch", "bad-pid",
         "status-list"],
)
def test_a_damaged_lease_is_a_usage_error_naming_a_real_command(
    store: Store, fields: dict[str, Any]
) -> None:
    write_lease(store, **fields)
    for read in (lambda: read_lease(store), lambda: LeaseObserver(store).poll()):
        with pytest.raises(InvalidLeaseError) as e:
            read()
        assert e.value.exit_code == 2 and "is not a valid lease" in str(e.value)
        assert f"`colabjob resume {store.url} --force`" in (e.value.hint or "")
    with pytest.raises(InvalidLeaseError):  # and acquiring without force is refused
        runner(store, FakeClock(), here("new")).acquire()


def test_unparseable_lease_is_taken_over_with_force_after_our_ttl(store: Store) -> None:
    store.write_bytes(LEASE_KEY, b"{not json")
    clock = FakeClock()
    lease = runner(store, clock, here("new"))
    assert lease.acquire(force=True).epoch == 1
    assert sum(clock.slept) == TTL
    got = read_lease(store)
    assert got is not None and got[0].holder.session_id == "new"


def test_force_watches_at_most_our_own_ttl(store: Store) -> None:
    clock = FakeClock(1_700_000_000.0)
    write_lease(store, ttl=3600.0, heartbeat_at=clock.time(), acquired_at=clock.time())
    lease = runner(store, clock, here("new"))
    with pytest.raises(LeaseHeldError) as e:
        lease.acquire()
    assert "waits up to 1m" in (e.value.hint or "")  # ours (60 s), not the file's hour
    assert lease.acquire(force=True).epoch == 4
    assert sum(clock.slept) == TTL


@pytest.mark.parametrize("gone", [[LEASE_KEY], [RECORD_KEY], [LEASE_KEY, RECORD_KEY]])
def test_vanished_storage_under_the_holder_is_a_lost_lease(store: Store, gone: list[str]) -> None:
    lease = runner(store, FakeClock(), here("me"))
    lease.acquire()
    for key in gone:
        store.delete(key)
    with pytest.raises(StorageLostError) as e:
        lease.current_epoch()  # the fence of every commit
    assert "the job's storage disappeared" in str(e.value) and e.value.exit_code == 1
    with pytest.raises(StorageLostError):
        CheckpointStore(store, fence=lease.current_epoch).save(1, {"w": b"x"}, epoch=1)
    assert store.list("ckpt") == []
    beat = lease.start_heartbeat(interval=3600)
    assert beat.beat() is False and (beat.lost or "").startswith("the job's storage disappeared")


def test_a_heartbeat_after_rm_rf_recreates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "job"
    store = open_store(str(root))
    create_record(store, job_id="j", config={})
    lease = Lease(store, holder=here("me"), ttl=TTL)
    lease.acquire()
    shutil.rmtree(root)
    with pytest.raises(StorageLostError):
        lease.renew()
    lease.release()
    assert not root.exists()
