"""The lease file ``control/lease.json`` as anyone may read it: who holds a job, and is it alive.

``Holder`` (the process that runs the job) and ``LeaseInfo`` (the file's content) are the
data; ``read_lease`` reads it with its version, ``held_error`` is what a second runner is told,
and ``LeaseObserver`` judges a lease from outside on the reader's own monotonic clock: expired
only when the reader has watched its version stay unchanged for longer than its TTL, the
holder's wall-clock heartbeat being a hint (STALE), never proof. Taking, renewing and releasing
the lease is ``colabjob.runner.lease``'s part.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from colabjob.errors import LeaseHeldError, StorageError
from colabjob.runner.clock import SYSTEM_CLOCK, Clock
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
    "read_lease",
]

LEASE_KEY = "control/lease.json"


def format_time(t: float) -> str:
    """``2025-01-31 09:30:00Z``: how lease and record times are shown to people."""
    return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@dataclass(frozen=True, kw_only=True)
class Holder:
    """Who runs the job: enough to find and recognise the process."""

    host: str
    platform: str
    pid: int
    session_id: str

    @classmethod
    def here(cls, *, platform: str = "local", session_id: str | None = None) -> Holder:
        return cls(
            host=socket.gethostname(),
            platform=platform,
            pid=os.getpid(),
            session_id=session_id or uuid.uuid4().hex[:12],
        )

    def describe(self) -> str:
        return f"{self.host} ({self.platform}, pid {self.pid}, session {self.session_id})"


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
        d = json.loads(data)
        return cls(
            holder=Holder(**d["holder"]),
            epoch=int(d["epoch"]),
            ttl=float(d["ttl"]),
            acquired_at=float(d["acquired_at"]),
            heartbeat_at=float(d["heartbeat_at"]),
            beats=int(d.get("beats", 0)),
            released=bool(d.get("released", False)),
            status=d.get("status") or {},
        )


def read_lease(store: Store, key: str = LEASE_KEY) -> tuple[LeaseInfo, Version] | None:
    """The lease and its version, or None if there is none."""
    got = store.read_versioned(key)
    if got is None:
        return None
    try:
        return LeaseInfo.from_json(got[0]), got[1]
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(
            f"{store.url}/{key} is not a valid lease: {e}",
            hint="if no runner is alive, delete it (`colabjob stop --force`) and resume",
        ) from e


def held_error(store: Store, info: LeaseInfo, now: float, *, why: str = "") -> LeaseHeldError:
    """The error a second runner sees: who holds the job, since when, until when."""
    beat_age = format_duration(max(0.0, now - info.heartbeat_at))
    msg = (
        f"job {store.url} is already running on {info.holder.describe()} "
        f"since {format_time(info.acquired_at)} (epoch {info.epoch}); last heartbeat {beat_age} "
        f"ago; the lease expires at {format_time(info.expires_at)} unless renewed"
    )
    return LeaseHeldError(
        f"{msg}{'; ' + why if why else ''}",
        hint=(
            "wait for it, stop it with `colabjob stop JOB`, or pass --force to take over once "
            f"the lease is confirmed expired (waits up to {format_duration(info.ttl)})"
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
