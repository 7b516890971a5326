"""One live runner per job: this runner's claim on ``control/lease.json`` and its fencing epoch.

A runner acquires the lease with a create-only write (or a compare-and-swap over a released
or expired one), renews it by compare-and-swap from a ``Heartbeat`` thread, and releases it on
a clean stop. Expiry is judged on the *reader's* monotonic clock (``colabjob.runner.lease.info``
holds the file's content and that judgement). Every takeover
bumps the fencing epoch (also stored in ``job.json``); a checkpoint commit calls
``current_epoch()`` and rejects a manifest carrying an older epoch, so a runner that was paused
and lost its lease cannot commit over the new one. A holder that provably died on this machine
(``Holder.gone``: a SIGKILL, an OOM kill, Colab's "Restart runtime") is taken over at once; one
elsewhere is watched for the TTL, capped at our own. While we hold the lease, a missing lease
or ``job.json`` (the job's directory was deleted) is a ``StorageLostError``: the fence and the
heartbeat stop every further write there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import (
    AlreadyExistsError,
    InvalidLeaseError,
    LeaseHeldError,
    LeaseLostError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StorageLostError,
)
from colabjob.runner.lease.info import (
    LEASE_KEY,
    Holder,
    LeaseInfo,
    held_error,
    read_lease,
)
from colabjob.runner.platforms import format_duration
from colabjob.runner.record import RECORD_KEY, read_record, update_record

if TYPE_CHECKING:
    from colabjob.storage.store import Store, Version

__all__ = ["DEFAULT_TTL", "Heartbeat", "Lease"]

DEFAULT_TTL = 120.0


class Lease:
    """This runner's claim on a job. Thread-safe; use as a context manager or acquire/release."""

    def __init__(
        self,
        store: Store,
        *,
        holder: Holder | None = None,
        ttl: float = DEFAULT_TTL,
        clock: Clock = SYSTEM_CLOCK,
        poll_seconds: float | None = None,
        sync_record: bool = True,
        key: str = LEASE_KEY,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.store, self.clock, self.key = store, clock, key
        self.holder = holder or Holder.here()
        self.ttl = float(ttl)
        self.poll_seconds = poll_seconds if poll_seconds is not None else min(10.0, ttl / 4)
        self.sync_record = sync_record
        self._lock = threading.RLock()
        self._info: LeaseInfo | None = None
        self._version: Version | None = None
        self._epoch = 0
        self._had_record = False  # job.json existed when we took the lease
        self.took_over: Holder | None = None  # a dead holder of this machine we replaced

    # -- state -----------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self._info is not None

    @property
    def epoch(self) -> int:
        """The epoch of our latest acquire (kept after a loss: it is what our commits carry)."""
        return self._epoch

    @property
    def info(self) -> LeaseInfo | None:
        return self._info

    def current_epoch(self) -> int:
        """The epoch in storage now: the fence a checkpoint commit compares its epoch with.
        ``StorageLostError`` if we took the lease and it (or ``job.json``) is gone."""
        got = read_lease(self.store, self.key)
        if self._epoch:
            self._check_present(got is not None)
        return got[0].epoch if got else self._floor_epoch()

    def _check_present(self, lease_present: bool) -> None:
        missing = [] if lease_present else [self.key]
        if self._had_record and not self.store.exists(RECORD_KEY):
            missing.append(RECORD_KEY)
        if missing:
            raise StorageLostError(
                f"the job's storage disappeared: {' and '.join(missing)} vanished from "
                f"{self.store.url} while this runner held the job (epoch {self._epoch}); "
                "nothing more is written there",
                hint="if the job directory was deleted by mistake, restore it (or start a new "
                "job); a rerun would otherwise start from scratch",
            )

    # -- acquire / renew / release -----------------------------------------------------------
    def acquire(self, *, force: bool = False) -> LeaseInfo:
        """Take the lease; ``LeaseHeldError`` if a live runner holds it.

        A released lease, one held by our own session, or one whose holder died on this
        machine (``Holder.gone``) is taken at once. One whose heartbeat looks stale by the
        holder's clock (or any, with ``force``) is watched for its TTL (at most ours) on our
        monotonic clock; if it does not change, we take it over and bump the epoch. A damaged
        lease file raises ``InvalidLeaseError`` unless ``force``: then it is watched likewise.
        """
        with self._lock:
            for _ in range(5):
                try:
                    got = read_lease(self.store, self.key)
                except InvalidLeaseError:
                    if not force:
                        raise
                    got = self._confirm_damaged()
                if got is None:
                    try:
                        return self._sync_record(self._write(None, None))
                    except AlreadyExistsError:
                        continue
                info, version = got
                mine = info.holder.session_id == self.holder.session_id
                if not (info.released or mine or self._dead(info)):
                    stale = self.clock.time() - info.heartbeat_at > info.ttl
                    if not (force or stale):
                        raise held_error(self.store, info, self.clock.time(), watch=self.ttl)
                    version = self._confirm_expired(info, version)
                try:
                    won = self._write(info, version)
                except PreconditionFailedError:
                    continue
                return self._sync_record(won)
            got = read_lease(self.store, self.key)
            if got is not None:
                raise held_error(self.store, got[0], self.clock.time(), why="lost a race for it")
            raise LeaseHeldError(
                f"could not acquire the lease of {self.store.url}: it kept changing"
            )

    def _dead(self, info: LeaseInfo) -> bool:
        """The holder was a process of this machine that is gone: take over without waiting."""
        if not info.holder.gone():
            return False
        self.took_over = info.holder
        return True

    def _confirm_damaged(self) -> tuple[LeaseInfo, Version] | None:
        """``force`` over a damaged lease file: it must stay unchanged for our TTL; then it
        is replaced as if expired (its epoch unknown: the record's is the floor)."""
        got = self.store.read_versioned(self.key)
        if got is None:
            return None
        start, version = self.clock.monotonic(), got[1]
        while (waited := self.clock.monotonic() - start) < self.ttl:
            self.clock.sleep(min(self.poll_seconds, self.ttl - waited))
            now = self.store.read_versioned(self.key)
            if now is None or now[1] != version:
                raise LeaseHeldError(
                    f"the damaged lease of {self.store.url} changed while we watched it: a "
                    "runner may be alive",
                    hint="wait for it to stop, then resume",
                )
        floor = LeaseInfo(
            holder=self.holder, epoch=0, ttl=self.ttl, acquired_at=0.0, heartbeat_at=0.0
        )
        return dataclasses.replace(floor, released=True), version

    def _confirm_expired(self, info: LeaseInfo, version: Version) -> Version:
        """Watch the lease for its TTL, at most ours, of our own monotonic time; it must not
        change. (A live holder beats every TTL/4, so it shows within ours unless its TTL is
        over four times ours; a damaged file's huge TTL cannot make us wait for ever.)"""
        watch = min(info.ttl, self.ttl)
        start = self.clock.monotonic()
        while (waited := self.clock.monotonic() - start) < watch:
            self.clock.sleep(min(self.poll_seconds, watch - waited))
            got = read_lease(self.store, self.key)
            if got is None or got[1] != version:
                if got is not None and got[0].released:
                    return got[1]
                now_info = got[0] if got else info
                raise held_error(
                    self.store,
                    now_info,
                    self.clock.time(),
                    why="its heartbeat advanced while we watched",
                )
        return version

    def _write(self, prev: LeaseInfo | None, version: Version | None) -> LeaseInfo:
        now = self.clock.time()
        epoch = max(prev.epoch if prev else 0, self._floor_epoch()) + 1
        info = LeaseInfo(
            holder=self.holder, epoch=epoch, ttl=self.ttl, acquired_at=now, heartbeat_at=now
        )
        if version is None:
            new_version = self.store.create(self.key, info.to_json())
        else:
            new_version = self.store.replace(self.key, info.to_json(), version)
        self._info, self._version, self._epoch = info, new_version, epoch
        return info

    def _sync_record(self, info: LeaseInfo) -> LeaseInfo:
        if self.sync_record:
            # no job.json yet: whoever creates it writes the epoch
            with contextlib.suppress(ObjectNotFoundError):
                update_record(self.store, lambda r: r.with_epoch(info.epoch), clock=self.clock)
                self._had_record = True
        return info

    def _floor_epoch(self) -> int:
        if not self.sync_record:
            return 0
        got = read_record(self.store)
        return got[0].epoch if got else 0

    def renew(self, status: Mapping[str, Any] | None = None) -> LeaseInfo:
        """Heartbeat by compare-and-swap; ``LeaseLostError`` if another runner took over."""
        with self._lock:
            if self._info is None or self._version is None:
                raise LeaseLostError(f"this runner does not hold the lease of {self.store.url}")
            info = dataclasses.replace(
                self._info,
                heartbeat_at=self.clock.time(),
                beats=self._info.beats + 1,
                status=dict(status) if status is not None else self._info.status,
            )
            try:
                self._version = self.store.replace(self.key, info.to_json(), self._version)
                if self._had_record:
                    self._check_present(True)
            except PreconditionFailedError as e:
                lost, self._info, self._version = self._info, None, None
                raise self._lost_error(lost) from e
            except StorageLostError:
                self._info, self._version = None, None
                raise
            self._info = info
            return info

    def _lost_error(self, mine: LeaseInfo) -> LeaseLostError:
        got = read_lease(self.store, self.key)
        if got is None:
            try:
                self._check_present(False)
            except StorageLostError as e:
                return e
        who = f"{got[0].holder.describe()} (epoch {got[0].epoch})" if got else "nobody (deleted)"
        return LeaseLostError(
            f"lost the lease of {self.store.url} (our epoch {mine.epoch}); it is now held by {who}",
            hint="this runner must stop; its commits will be rejected by the epoch fence",
        )

    def release(self) -> None:
        """Give the lease up after a clean stop (no-op if not held or already lost)."""
        with self._lock:
            if self._info is None or self._version is None:
                return
            info = dataclasses.replace(self._info, released=True, heartbeat_at=self.clock.time())
            try:
                self.store.replace(self.key, info.to_json(), self._version)
            except PreconditionFailedError:
                pass  # somebody took over already; nothing of ours to release
            finally:
                self._info, self._version = None, None

    def start_heartbeat(
        self,
        *,
        interval: float | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> Heartbeat:
        """Start a daemon thread renewing every ``interval`` (default TTL/4)."""
        return Heartbeat(
            self, interval=interval or self.ttl / 4, status=status, on_lost=on_lost
        ).start()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Heartbeat:
    """Renews a lease periodically; reports loss once through ``on_lost(message)``."""

    def __init__(
        self,
        lease: Lease,
        *,
        interval: float,
        status: Callable[[], Mapping[str, Any]] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.lease, self.interval = lease, float(interval)
        self.status, self.on_lost = status, on_lost
        self.lost: str | None = None
        self.last_error: BaseException | None = None
        self.beats = 0
        self._last_ok = lease.clock.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> bool:
        """Renew once. False once the lease is lost (taken over, or unrenewable for a TTL)."""
        if self.lost is not None:
            return False
        clock = self.lease.clock
        try:
            self.lease.renew(self.status() if self.status else None)
        except LeaseLostError as e:
            self._report(str(e))
            return False
        except (StorageError, OSError) as e:  # transient: keep trying until the TTL runs out
            self.last_error = e
            if clock.monotonic() - self._last_ok >= self.lease.ttl:
                self._report(
                    f"could not renew the lease for {format_duration(self.lease.ttl)}: {e}"
                )
                return False
            return True
        self._last_ok = clock.monotonic()
        self.beats += 1
        return True

    def _report(self, message: str) -> None:
        self.lost = message
        if self.on_lost is not None:
            self.on_lost(message)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.beat():
                return

    def start(self) -> Heartbeat:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="colabjob-heartbeat", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
