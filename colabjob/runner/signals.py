"""Forwarding stop signals from a parent runner to the processes it started.

The supervisor (one child per segment) and the multi-process launcher (one child per rank)
both pass SIGTERM, SIGINT and SIGUSR1 on to their children, and SIGHUP as SIGTERM (the
terminal went away: stop as if asked to). ``ForwardedSignals`` installs a handler for them
from the main thread only and puts the previous handlers back afterwards.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

FORWARDED = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")
SIGHUP = getattr(signal, "SIGHUP", None)


def as_child_signal(signum: int) -> int:
    """The signal a child gets for ``signum`` received by its parent."""
    return int(signal.SIGTERM) if signum == SIGHUP else signum


class ForwardedSignals:
    """``handler(signum, frame)`` for every forwarded signal while installed."""

    def __init__(self, handler: Callable[[int, Any], None]) -> None:
        self.handler = handler
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works only there; the caller's own handlers stay
        for name in FORWARDED:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self.handler)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
