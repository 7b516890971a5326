"""The lease file ``control/lease.json`` as anyone may read it: who holds a job, and is it alive.

``Holder`` (the process that runs the job) and ``LeaseInfo`` (the file's content) are the
data; ``read_lease`` reads it with its version, ``held_error`` is what a second runner is told,
and ``LeaseObserver`` judges a lease from outside on the reader's own monotonic clock: expired
only when the reader has watched its version stay unchanged for longer than its TTL, the
holder's wall-clock heartbeat being a hint (STALE), never proof. Taking, renewing and releasing
the lease is ``colabjob.runner.lease.claim``'s part.

A holder also records its machine (host name, Linux boot id, pid namespace) and its process
start time (``/proc/<pid>/stat`` field 22), so a runner on the *same* machine can prove the
holder is dead (``holder_gone``: pid gone, a zombie, or reused by another process) and take
over at once instead of waiting out the TTL. Leases written without these fields (older
versions, other machines) keep the TTL rules. Every field is checked with bounds when read: a
damaged file is an ``InvalidLeaseError`` (exit 2), never a crash further on.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import InvalidLeaseError, LeaseHeldError
from colabjob.runner.platforms import format_duration
from colabjob.runner.states import LeaseStatus

if TYPE_CHECKING:
    from colabjob.storage.store import Store, Version

__all__ = [
    "LEASE_KEY",
    "Holder",
    "LeaseInfo",
    "LeaseObserver",
    "format_time",
    "held_error",
    "holder_gone",
    "read_lease",
]

LEASE_KEY = "control/lease.json"
MAX_TTL = 24 * 3600.0  # a lease claiming a longer TTL is damaged
MAX_TIME = 32_503_680_000.0  # 3000-01-01: a later timestamp is damaged
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def boot_id() -> str:
    """This machine's boot id (Linux; "" elsewhere): a host name alone may repeat."""
    return _read_text(_BOOT_ID)


def pid_namespace() -> str:
    """This process's pid namespace ("" if unknown): pids compare only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """``pid``'s start time in clock ticks since boot, or None if it is gone or a zombie."""
    stat = _read_text(f"/proc/{pid}/stat")
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last
    rest = stat.rpartition(")")[2].split()
    if len(rest) < 20 or rest[0] in ("Z", "X"):
        return None
    try:
        return int(rest[19])  # field 22 of proc(5)
    except ValueError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return True  # cannot tell: assume alive
    return True


def format_time(t: float) -> str:
    """``2025-01-31 09:30:00Z``: how lease and record times are shown to people."""
    return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@dataclass(frozen=True, kw_only=True)
class Holder:
    """Who runs the job: enough to find and recognise the process. ``boot_id``, ``pid_ns``
    and ``start_time`` (clock ticks since boot) identify the process on its machine; empty
    or 0 in leases written by older versions."""

    host: str
    platform: str
    pid: int
    session_id: str
    boot_id: str = ""
    pid_ns: str = ""
    start_time: int = 0

    @classmethod
    def here(cls, *, platform: str = "local", session_id: str | None = None) -> Holder:
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            platform=platform,
            pid=pid,
            session_id=session_id or uuid.uuid4().hex[:12],
            boot_id=boot_id(),
            pid_ns=pid_namespace(),
            start_time=process_start(pid) or 0,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Holder:
        """Checked; fields a newer version added are ignored."""
        if not isinstance(d, Mapping):
            raise TypeError("holder must be an object")
        text = {k: d[k] for k in ("host", "platform", "session_id")}
        text |= {k: d.get(k, "") for k in ("boot_id", "pid_ns")}
        if any(not isinstance(v, str) or len(v) > 256 for v in text.values()):
            raise TypeError("holder names must be strings of at most 256 characters")
        pid, start = d["pid"], d.get("start_time", 0)
        if not _is_int(pid) or not 0 < pid < 2**31:
            raise ValueError(f"holder pid {pid!r} is not a process id")
        if not _is_int(start) or start < 0:
            raise ValueError(f"holder start_time {start!r} is not a tick count")
        return cls(pid=pid, start_time=start, **text)

    def same_machine(self) -> bool:
        """Recorded on this machine (same host, boot and pid namespace) by a version that
        records the process start time, so ``gone()`` can judge it."""
        return bool(
            self.boot_id
            and self.start_time
            and self.host == socket.gethostname()
            and self.boot_id == boot_id()
            and self.pid_ns == pid_namespace()
        )

    def gone(self) -> bool:
        """Provably dead: on this machine, and its pid is free or now another process."""
        if not self.same_machine():
            return False
        return not _pid_alive(self.pid) or process_start(self.pid) != self.start_time

    def describe(self) -> str:
        return f"{self.host} ({self.platform}, pid {self.pid}, session {self.session_id})"


def holder_gone(holder: Holder) -> bool:
    """Whether ``holder`` is a process of this machine that no longer runs (see ``Holder``)."""
    return holder.gone()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _time(d: Mapping[str, Any], name: str) -> float:
    v = d[name]
    if _is_int(v) or isinstance(v, float):
        t = float(v)
        if math.isfinite(t) and 0.0 <= t < MAX_TIME:
            return t
    raise ValueError(f"{name} {v!r} is not a time between 1970 and 3000")


@dataclass(frozen=True, kw_only=True)
class LeaseInfo:
    """The content of ``control/lease.json``. Times are the holder's wall clock."""

    holder: Holder
    epoch: int
    ttl: float
    acquired_at: float
    heartbeat_at: float
    beats: int = 0
    released: bool = False
    status: Mapping[str, Any] = field(default_factory=dict)

    @property
    def expires_at(self) -> float:
        """When the lease lapses unless renewed (by the holder's clock; a hint)."""
        return self.heartbeat_at + self.ttl

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["status"] = dict(self.status)
        return (json.dumps(d, sort_keys=True, default=str) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseInfo:
        """Parse and check every field's type and bounds (``ValueError``/``KeyError``/
        ``TypeError`` on a damaged file)."""
        d = json.loads(data)
        if not isinstance(d, dict):
            raise TypeError("the lease is not a JSON object")
        epoch, beats, ttl = d["epoch"], d.get("beats", 0), d["ttl"]
        if not _is_int(epoch) or not 0 <= epoch < 2**62:
            raise ValueError(f"epoch {epoch!r} is not a fencing epoch")
        if not _is_int(beats) or beats < 0:
            raise ValueError(f"beats {beats!r} is not a count")
        if not (_is_int(ttl) or isinstance(ttl, float)) or not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl {ttl!r} is not between 0 and {MAX_TTL:.0f} seconds")
        status, released = d.get("status") or {}, d.get("released", False)
        if not isinstance(status, dict) or not isinstance(released, bool):
            raise TypeError("status must be an object and released a boolean")
        return cls(
            holder=Holder.from_dict(d["holder"]),
            epoch=epoch,
            ttl=float(ttl),
            acquired_at=_time(d, "acquired_at"),
            heartbeat_at=_time(d, "heartbeat_at"),
            beats=beats,
            released=released,
            status=status,
        )


def read_lease(store: Store, key: str = LEASE_KEY) -> tuple[LeaseInfo, Version] | None:
    """The lease and its version, or None if there is none."""
    got = store.read_versioned(key)
    if got is None:
        return None
    try:
        return LeaseInfo.from_json(got[0]), got[1]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise InvalidLeaseError(
            f"{store.url}/{key} is not a valid lease: {type(e).__name__}: {e}",
            hint=f"if no runner is alive, take the job over with {force_command(store)} (it "
            "replaces the file once it stayed unchanged for the lease TTL)",
        ) from e


def force_command(store: Store) -> str:
    """The CLI command that takes a job over once its lease is confirmed expired."""
    return f"`colabjob resume {store.url} --force`"


def held_error(
    store: Store, info: LeaseInfo, now: float, *, why: str = "", watch: float | None = None
) -> LeaseHeldError:
    """The error a second runner sees: who holds the job, since when, until when.
    ``watch``: how long a forced takeover watches the lease (default: its TTL)."""
    beat_age = format_duration(max(0.0, now - info.heartbeat_at))
    msg = (
        f"job {store.url} is already running on {info.holder.describe()} "
        f"since {format_time(info.acquired_at)} (epoch {info.epoch}); last heartbeat {beat_age} "
        f"ago; the lease expires at {format_time(info.expires_at)} unless renewed"
    )
    wait = format_duration(info.ttl if watch is None else min(watch, info.ttl))
    return LeaseHeldError(
        f"{msg}{'; ' + why if why else ''}",
        hint=(
            f"wait for it, stop it with `colabjob stop {store.url}`, or, if its machine is "
            f"gone, take over with {force_command(store)} once the lease is confirmed expired "
            f"(waits up to {wait})"
        ),
    )


class LeaseObserver:
    """Judges a lease from outside, on this reader's own monotonic clock."""

    def __init__(self, store: Store, *, clock: Clock = SYSTEM_CLOCK, key: str = LEASE_KEY) -> None:
        self.store, self.clock, self.key = store, clock, key
        self._token: str | None = None
        self._since = clock.monotonic()

    @property
    def unchanged_for(self) -> float:
        """Seconds (our monotonic clock) since we last saw the lease change."""
        return self.clock.monotonic() - self._since

    def poll(self) -> tuple[LeaseInfo | None, LeaseStatus]:
        got = read_lease(self.store, self.key)
        token = None if got is None else got[1].token
        if token != self._token:
            self._token, self._since = token, self.clock.monotonic()
        if got is None:
            return None, LeaseStatus.ABSENT
        info = got[0]
        if info.released:
            return info, LeaseStatus.RELEASED
        if self.unchanged_for >= info.ttl:
            return info, LeaseStatus.EXPIRED
        if self.clock.time() - info.heartbeat_at > info.ttl:
            return info, LeaseStatus.STALE
        return info, LeaseStatus.LIVE
