"""Stop requests: ``control/stop.json`` in a job's storage, asking its live runner to stop.

``request_stop`` (``colabjob stop``, the notebook watchdog) writes a ``StopRequest`` aimed
at the current lease epoch, from any machine; the runner's ``Watchdog``
(``colabjob.runner.watchdog``) reads it with ``read_stop_request``. ``stop_probe`` is the
cheap look the watchdog takes at step boundaries where one exists: a ``stat`` of the file
on local disk and Drive, the object's version in memory; elsewhere (GCS) None, and the
watchdog's poller thread reads the request on its own schedule.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.runner.lease.info import read_lease

if TYPE_CHECKING:
    from colabjob.storage.store import Store

__all__ = [
    "STOP_KEY",
    "StopRequest",
    "clear_stop_request",
    "read_stop_request",
    "request_stop",
    "stop_probe",
]

log = logging.getLogger(__name__)

STOP_KEY = "control/stop.json"


@dataclass(frozen=True, kw_only=True)
class StopRequest:
    """``control/stop.json``: ask the runner holding lease ``epoch`` (or newer) to stop."""

    id: str
    requested_at: float
    requested_by: str
    epoch: int = 0
    cancel: bool = False
    reason: str = ""

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> StopRequest:
        d = json.loads(data)
        return cls(
            id=str(d["id"]),
            requested_at=float(d["requested_at"]),
            requested_by=str(d.get("requested_by", "")),
            epoch=int(d.get("epoch", 0)),
            cancel=bool(d.get("cancel", False)),
            reason=str(d.get("reason", "")),
        )


def request_stop(
    store: Store,
    *,
    cancel: bool = False,
    reason: str = "",
    clock: Clock = SYSTEM_CLOCK,
    requested_by: str | None = None,
) -> StopRequest:
    """Ask the job's live runner to checkpoint and stop (``cancel``: then mark it CANCELLED).

    The request targets the current lease epoch, so a runner that resumes later (with a
    newer epoch) does not trip over an old request.
    """
    lease = read_lease(store)
    request = StopRequest(
        id=uuid.uuid4().hex[:12],
        requested_at=clock.time(),
        requested_by=requested_by or socket.gethostname(),
        epoch=lease[0].epoch if lease else 0,
        cancel=cancel,
        reason=reason,
    )
    store.write_bytes(STOP_KEY, request.to_json())
    return request


def read_stop_request(store: Store) -> StopRequest | None:
    got = store.read_versioned(STOP_KEY)
    if got is None:
        return None
    try:
        return StopRequest.from_json(got[0])
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable stop request %s/%s", store.url, STOP_KEY)
        return None


def clear_stop_request(store: Store) -> None:
    store.delete(STOP_KEY)


def stop_probe(store: Store) -> Callable[[], object] | None:
    """A cheap look at ``control/stop.json`` where one exists: its ``stat`` signature on
    local disk and Drive, its version in memory; None (rely on the poller) elsewhere."""
    from colabjob.storage.local import LocalStore
    from colabjob.storage.memory import MemoryStore

    if isinstance(store, LocalStore):  # Drive too: a FUSE mount is a local path
        path = os.path.join(store.url, *STOP_KEY.split("/"))

        def stat() -> object:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            return (st.st_ino, st.st_size, st.st_mtime_ns)

        return stat
    if isinstance(store, MemoryStore):

        def version() -> object:
            got = store.read_versioned(STOP_KEY)
            return None if got is None else got[1]

        return version
    return None
