"""Forwarding stop signals from a parent runner to the processes it started.

The supervisor (one child per segment) and the multi-process launcher (one child per rank)
both pass SIGTERM, SIGINT and SIGUSR1 on to their children, and SIGHUP as SIGTERM (the
terminal went away: stop as if asked to). ``ForwardedSignals`` installs a handler for them
from the main thread only and puts the previous handlers back afterwards.

``keep_going_after_completion`` is what a process does with them once its job is COMPLETED
(the final checkpoint committed and recorded): the user's code after ``train()`` (saving
the model, an evaluation) still runs, and a SIGTERM/SIGUSR1 that arrives then (a process
manager signalling the whole group) would otherwise turn the finished run into a -15
exit. They are noted on stderr and the process goes on to exit 0; a first SIGINT too, a
second one still aborts. Only default dispositions are replaced (a handler the user
installed stays), and a notebook's SIGINT is left alone (it interrupts the next cell).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
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


AFTER_COMPLETION = ("SIGTERM", "SIGUSR1", "SIGINT")
_interrupts: list[int] = []  # SIGINTs seen after completion (appended by the handler)


def _after_completion(signum: int, frame: Any) -> None:
    # A raw write: async-signal-safe, no buffered stream to re-enter.
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        if _interrupts:
            raise KeyboardInterrupt
        _interrupts.append(signum)
        tail = " (press Ctrl-C again to abort)"
    else:
        tail = ""
    line = f"colabjob: received {name} after the job completed; finishing{tail}\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode())


def _interactive() -> bool:
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    return bool(get is not None and get() is not None) or hasattr(sys, "ps1")


def keep_going_after_completion(signums: list[int] | None = None) -> list[int]:
    """Note (and survive) stop signals from now on: the job is complete (module docstring).
    Returns the signals whose handler was replaced; main thread only (else none)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    if signums is None:
        signums = [int(getattr(signal, n)) for n in AFTER_COMPLETION if hasattr(signal, n)]
    replaced = []
    _interrupts.clear()
    for signum in signums:
        current = signal.getsignal(signum)
        if signum == signal.SIGINT:
            default = current is signal.default_int_handler and not _interactive()
        else:
            default = current == signal.SIG_DFL
        if default or current is _after_completion:
            signal.signal(signum, _after_completion)
            replaced.append(signum)
    return replaced


def forget_completion(signums: list[int]) -> None:
    """Put the defaults back where ``keep_going_after_completion`` had replaced them (a
    later segment in the same process did not complete: its stop signals act again)."""
    for signum in signums:
        if signal.getsignal(signum) is _after_completion:
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, default)
