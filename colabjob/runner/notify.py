"""Notifications through apprise: which URLs, how they are shown, and the background sender.

The URLs come from the job spec's ``notify:`` list, ``--notify URL`` on start/resume,
``colabjob.session(..., notify=[...])`` and the ``COLABJOB_NOTIFY`` environment variable
(URLs separated by spaces or newlines); ``notify_urls`` joins them. A URL holds its
endpoint's token, so it is never written to the job record, metrics, logs or status
output: everything that shows one shows ``redact(url)`` (scheme and host, the rest masked),
and an endpoint's answer is passed through ``scrub`` before it is shown. apprise is an
optional extra (``colabjob[notify]``); ``require_notify`` refuses configured URLs without
it (``ConfigError``, exit 2, with the pip command) before a segment takes the lease.

``Notifier`` sends from one daemon thread: ``send`` only queues, so a slow or dead endpoint
never blocks a training step; each message has a short timeout (``SEND_TIMEOUT``), an
endpoint's first failure is logged once, and ``close`` waits at most ``CLOSE_WAIT`` for
what is still queued. Which events are sent, and only once, is ``runner.notify_events``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from colabjob.errors import ConfigError

__all__ = [
    "CLOSE_WAIT",
    "ENV_VAR",
    "SEND_TIMEOUT",
    "Delivery",
    "Notifier",
    "deliver",
    "notify_urls",
    "redact",
    "require_notify",
    "scrub",
]

log = logging.getLogger(__name__)

ENV_VAR = "COLABJOB_NOTIFY"
SEND_TIMEOUT = 5.0  # seconds: apprise's connect and read timeouts per endpoint
CLOSE_WAIT = 5.0  # seconds a closing segment waits for its last messages to go out
INSTALL_HINT = "pip install 'colabjob[notify]' (apprise), or remove the notify URLs"
MASK = "***"
_HOSTNAME = re.compile(
    r"localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}|\d{1,3}(?:\.\d{1,3}){3}"
)
_SPLIT = re.compile(r"\s+|,(?=\s*[A-Za-z][\w+.-]*://)")


def redact(url: str) -> str:
    """``url`` with only its scheme and host kept: ``ntfy://ntfy.sh/***``,
    ``json://127.0.0.1:8080/***``, ``tgram://***`` (a Telegram bot token sits where a host
    would). User, password, path and query are masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return MASK
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, hostport = authority.rpartition("@")
    host, colon, port = hostport.partition(":")
    shown = host if _HOSTNAME.fullmatch(host) else MASK
    if shown != MASK and colon and port.isdigit():
        shown = f"{shown}:{port}"
    hidden = len(rest.rstrip("/")) > len(authority) or bool(colon and not port.isdigit())
    prefix = f"{MASK}@" if at and userinfo else ""
    return f"{scheme}://{prefix}{shown}" + (f"/{MASK}" if hidden and shown != MASK else "")


def _secrets(url: str) -> list[str]:
    """The parts of ``url`` that ``redact`` hides (to scrub them out of an answer)."""
    shown = redact(url)
    rest = url.partition("://")[2]
    parts = [p for p in re.split(r"[/?#&=@:,]", rest) if len(p) >= 4 and p not in shown]
    return sorted(set(parts), key=len, reverse=True)


def scrub(text: str, urls: Iterable[str]) -> str:
    """``text`` (an endpoint's answer, an apprise log line) without any secret part of
    ``urls``."""
    for url in urls:
        text = text.replace(url, redact(url))
        for part in _secrets(url):
            text = text.replace(part, MASK)
    return text


def split_urls(text: str) -> list[str]:
    """The URLs of ``COLABJOB_NOTIFY``: separated by spaces, newlines or commas."""
    return [u for u in _SPLIT.split(text.strip()) if u]


def notify_urls(
    *given: Iterable[str] | None, environ: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The URLs to notify: each list in ``given`` (spec, flags, arguments), then
    ``COLABJOB_NOTIFY``; duplicates once, in first-seen order."""
    env = os.environ if environ is None else environ
    urls: list[str] = []
    for group in (*given, split_urls(env.get(ENV_VAR, ""))):
        for url in [group] if isinstance(group, str) else group or ():  # one URL, not chars
            url = str(url).strip()
            if url and url not in urls:
                urls.append(url)
    return tuple(urls)


def _apprise() -> Any:
    try:
        import apprise
    except ImportError:
        return None
    return apprise


def require_notify(urls: Iterable[str]) -> None:
    """Refuse (``ConfigError``, exit 2) configured URLs without apprise, or one apprise
    does not understand; the message shows them redacted."""
    urls = list(urls)
    if not urls:
        return
    apprise = _apprise()
    if apprise is None:
        shown = ", ".join(redact(u) for u in urls)
        raise ConfigError(
            f"notifications are configured ({shown}) but apprise is not installed",
            hint=INSTALL_HINT,
        )
    for url in urls:
        if apprise.Apprise.instantiate(url, suppress_exceptions=True) is None:
            raise ConfigError(
                f"notify URL {redact(url)} is not one apprise understands",
                hint="see https://github.com/caronc/apprise/wiki for the URL of each service",
            )


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One message to one endpoint: whether it went out, and the endpoint's answer
    (apprise's warnings about it, secrets scrubbed)."""

    ok: bool
    answer: str


class _Capture(logging.Handler):
    """apprise's log lines, to the list of the thread that is sending (if any). Its logger
    stops propagating: its lines can name a token, and only scrubbed answers are shown."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        lines = getattr(self.local, "lines", None)
        if lines is not None:
            lines.append(record.getMessage())


_CAPTURE = _Capture()
_INSTALL = threading.Lock()


def _capture_apprise_logs() -> None:
    with _INSTALL:
        logger = logging.getLogger("apprise")
        if _CAPTURE not in logger.handlers:
            logger.addHandler(_CAPTURE)
            logger.propagate = False


def deliver(url: str, title: str, body: str, *, timeout: float = SEND_TIMEOUT) -> Delivery:
    """Send one message to ``url`` now (blocking at most about ``2 * timeout``)."""
    apprise = _apprise()
    if apprise is None:
        return Delivery(ok=False, answer="apprise is not installed")
    plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    if plugin is None:
        return Delivery(ok=False, answer="not a URL apprise understands")
    plugin.socket_connect_timeout = plugin.socket_read_timeout = float(timeout)
    _capture_apprise_logs()
    lines: list[str] = []
    _CAPTURE.local.lines = lines  # no lock held over the network: endpoints never wait
    try:
        ok = bool(plugin.notify(body=body, title=title))
    except Exception as e:  # a plugin's bug must not reach the training process
        ok = False
        lines.append(f"{type(e).__name__}: {e}")
    finally:
        _CAPTURE.local.lines = None
    answer = "; ".join(line for line in lines if line.strip())
    return Delivery(ok=ok, answer=scrub(answer or ("sent" if ok else "no answer"), [url]))


_STOP = object()


class Notifier:
    """Sends messages to ``urls`` from one daemon thread; ``send`` never blocks."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        timeout: float = SEND_TIMEOUT,
        say: Callable[[str], None] | None = None,
        send_one: Callable[..., Delivery] = deliver,
    ) -> None:
        self.urls = tuple(urls)
        self.timeout, self.say, self.send_one = timeout, say, send_one
        self.failed: set[str] = set()  # endpoints whose failure was logged (once each)
        self.sent = 0
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None

    def send(self, title: str, body: str) -> None:
        """Queue a message for every endpoint (returns at once)."""
        if not self.urls:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="colabjob-notify", daemon=True)
            self._thread.start()
        self._queue.put((title, body))

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Let queued messages go out for at most ``wait`` seconds, then stop."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(wait)

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            title, body = cast("tuple[str, str]", item)
            for url in self.urls:
                try:
                    got = self.send_one(url, title, body, timeout=self.timeout)
                except Exception as e:
                    got = Delivery(ok=False, answer=scrub(f"{type(e).__name__}: {e}", [url]))
                if got.ok:
                    self.sent += 1
                elif url not in self.failed:
                    self.failed.add(url)
                    self._log(
                        f"notification to {redact(url)} failed ({got.answer}); training goes "
                        "on, and further failures of this endpoint are not logged"
                    )

    def _log(self, message: str) -> None:
        log.warning("%s", message)
        if self.say is not None:
            with contextlib.suppress(Exception):  # the display may be closed by now
                self.say(message)
