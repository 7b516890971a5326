"""Hand-written fakes shared by every test package.

``FakeClock`` satisfies ``colabjob.clock.Clock``: ``time()`` and ``monotonic()`` move
together, ``sleep(s)`` and ``advance(s)`` move both forward at once (never really waiting),
and an optional ``on_sleep`` hook lets a test play "meanwhile, elsewhere" (another runner
heartbeating, a step finishing) deterministically between two reads of the clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class FakeClock:
    """A clock that only moves when told to. Thread-safe."""

    def __init__(
        self,
        start: float = 1_700_000_000.0,
        *,
        monotonic_start: float = 1_000.0,
        on_sleep: Callable[[float], None] | None = None,
    ) -> None:
        self._wall = float(start)
        self._mono = float(monotonic_start)
        self._lock = threading.Lock()
        self.on_sleep = on_sleep
        self.slept: list[float] = []

    def time(self) -> float:
        with self._lock:
            return self._wall

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._wall += seconds
            self._mono += seconds

    def sleep(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        self.slept.append(seconds)
        self.advance(seconds)
        if self.on_sleep is not None:
            self.on_sleep(seconds)

    def jump_wall(self, seconds: float) -> None:
        """Move only the wall clock (an NTP step), either way; monotonic time is untouched."""
        with self._lock:
            self._wall += seconds

    def __repr__(self) -> str:
        return f"FakeClock(time={self._wall:.3f}, monotonic={self._mono:.3f})"
