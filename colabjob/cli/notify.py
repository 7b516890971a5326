"""``colabjob notify test URL``: send one test message through apprise and report the
endpoint's answer (exit 0 sent, 1 refused or unreachable, 2 without apprise or for a URL
apprise does not understand). The URL is shown redacted (``colabjob.runner.notify``)."""

from __future__ import annotations

import argparse

from colabjob.cli.common import note
from colabjob.errors import ConfigError, ExitCode


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("notify", parents=[common], help="notifications (apprise)")
    what = p.add_subparsers(dest="notify_command", metavar="ACTION")
    t = what.add_parser("test", parents=[common], help="send a test message to URL")
    t.add_argument("url", metavar="URL", help="an apprise URL, e.g. ntfy://ntfy.sh/TOPIC")
    t.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    t.set_defaults(func=cmd_notify_test)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return ExitCode.USAGE


def cmd_notify_test(args: argparse.Namespace) -> int:
    from colabjob.runner.notify import deliver, redact, require_notify

    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    require_notify([args.url])
    got = deliver(
        args.url,
        "colabjob: test",
        "A test message from `colabjob notify test`: notifications reach you.",
        timeout=args.timeout,
    )
    shown = redact(args.url)
    if got.ok:
        print(f"colabjob: sent a test message to {shown} ({got.answer})")
        return ExitCode.DONE
    note(f"colabjob: the test message to {shown} was not delivered: {got.answer}")
    return ExitCode.FAILED
