"""The ``colabjob`` command: a thin layer over the library, one module per command group.

``run`` (init, start, resume, demo, handoff), ``control`` (stop, watchdog), ``info``
(status, ls, logs, plot, gc), ``repair`` (rebuild job.json from a checkpoint), ``kaggle``
(push a job to a Kaggle kernel), ``notify`` (send a test notification). Each command
returns an exit code: 0 done, 75 paused (resume in the next session), 1 failed, 2
usage/config/lease error. Errors print one line and a
hint (``ColabJobError.__str__``), never a traceback unless ``--debug``. Only argparse is
imported up front; each command imports what it needs, so ``status`` and ``ls`` never load
torch and answer in well under a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from colabjob.errors import ColabJobError, ExitCode

__all__ = ["build_parser", "main", "quiet_warnings"]

_EPILOG = """\
exit codes: 0 done, 75 paused (resume in the next session), 1 failed,
            2 usage/config/lease error
quick start:
  colabjob init --kind lora -o job.yaml     # then edit job.yaml
  colabjob start job.yaml                   # later, in a new session:
  colabjob resume /content/drive/MyDrive/colabjob/my-lora-job
"""


def build_parser() -> argparse.ArgumentParser:
    import colabjob.cli.control as control
    import colabjob.cli.info as info
    import colabjob.cli.kaggle as kaggle
    import colabjob.cli.notify as notify
    import colabjob.cli.repair as repair
    import colabjob.cli.run as run
    from colabjob import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and debug logs",
    )
    parser = argparse.ArgumentParser(
        prog="colabjob",
        description="Train language models across sessions that end, resuming exactly.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"colabjob {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (run, info, control, repair, kaggle, notify):
        module.add_parsers(sub, common)
    return parser


def quiet_warnings() -> None:
    """A quarantined checkpoint is reported once, by its log line; its
    ``CorruptCheckpointWarning`` (for library callers) would print it a second time as a
    raw ``warnings`` line with a source path."""
    import warnings

    from colabjob.storage.catalog import CorruptCheckpointWarning

    warnings.filterwarnings("ignore", category=CorruptCheckpointWarning)


def _fail(message: str) -> None:
    print(f"colabjob: error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns (and, as a console script, exits with) its exit code."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    debug = bool(getattr(args, "debug", False))
    quiet_warnings()
    if debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ColabJobError as e:
        if debug:
            import traceback

            traceback.print_exc()
        _fail(str(e))
        return int(e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted")
        return ExitCode.FAILED
    except BrokenPipeError:  # `colabjob logs | head`
        return ExitCode.DONE
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        _fail(f"{type(e).__name__}: {e}\n  hint: rerun with --debug for the traceback")
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
