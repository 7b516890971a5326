"""The one source of time for every layer (top level, so storage, jobs and runner share it).

Every decision about time (deadlines, heartbeats, lease expiry, checkpoint intervals) goes
through a ``Clock``: wall time for what is written down and compared across machines,
monotonic time for every duration measured on this machine, and ``sleep`` for waiting.
Production code uses ``SYSTEM_CLOCK``; tests pass a fake one (``tests/fakes.py``) that
advances instantly, so no test ever sleeps to reach a deadline. No torch here.
"""

from __future__ import annotations

import time
from time import monotonic as _monotonic
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Wall time, monotonic time and sleep, injected everywhere time matters."""

    def time(self) -> float:
        """Seconds since the epoch (wall clock; may jump)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (only meaningful on this machine)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a fake clock advances instead)."""
        ...


class SystemClock:
    """The real clock: ``time.time``, ``time.monotonic`` and ``time.sleep``."""

    def time(self) -> float:
        return time.time()

    # the function itself, not a method calling it: the Session reads it every step
    monotonic = staticmethod(_monotonic)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK: Clock = SystemClock()
