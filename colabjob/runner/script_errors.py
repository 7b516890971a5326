"""How a usage error reaches the user of a script (``colabjob.session()``, ``resumable()``).

The CLI prints a ``ColabJobError`` as one line and its hint and exits with its code (2 for a
held lease, a bad config, a changed batch geometry); a script should do the same rather than
show a traceback. ``reported_for_script()`` wraps a segment: an error with exit code 2 is
printed to stderr as the CLI prints it and raised as ``SystemExit(2)`` (in a notebook, where
exiting would kill the kernel, the error is re-raised instead). Either way its hint names the
keyword argument a script passes (``force=True``, ``allow_geometry_change=True``) instead of
the CLI flag; ``script_hint`` is that rewrite.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator

from colabjob.errors import ColabJobError, ExitCode

__all__ = ["interactive", "reported_for_script", "script_hint"]


# CLI wording in hints -> what a script passes instead (longest first)
_FOR_SCRIPT = (
    (re.compile(r"`colabjob resume \S+ --force`"), "`force=True`"),
    (re.compile(r"--allow-geometry-change\b"), "allow_geometry_change=True"),
    (re.compile(r"--force\b(?!-)"), "force=True"),
)


def script_hint(hint: str | None) -> str | None:
    """``hint`` with the CLI flags replaced by the keyword arguments of a script."""
    if not hint:
        return hint
    for pattern, replacement in _FOR_SCRIPT:
        hint = pattern.sub(replacement, hint)
    return hint


def interactive() -> bool:
    """Inside IPython/Jupyter/Colab, where exiting would kill nothing useful."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    return bool(get is not None and get() is not None) or hasattr(sys, "ps1")


@contextlib.contextmanager
def reported_for_script(*, exit_on_error: bool | None = None) -> Iterator[None]:
    """Turn a usage error (exit code 2) into the CLI's message and ``SystemExit(2)``.

    ``exit_on_error`` None: exit in a script, re-raise in a notebook. The error's hint names
    keyword arguments in both cases."""
    try:
        yield
    except ColabJobError as e:
        if e.exit_code != ExitCode.USAGE:
            raise
        e.hint = script_hint(e.hint)
        exit_now = not interactive() if exit_on_error is None else exit_on_error
        if not exit_now:
            raise
        print(f"colabjob: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(ExitCode.USAGE) from None
