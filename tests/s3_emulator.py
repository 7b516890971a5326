"""Run moto's S3 server on loopback: shared by the pytest fixtures (and usable by benchmarks).

``running_s3_emulator()`` starts this file as a child process: moto's server-mode WSGI app
(``moto[server]`` from PyPI, the same app as the ``moto_server`` command) served by werkzeug
on 127.0.0.1, creates the given buckets, points botocore at it (``AWS_ENDPOINT_URL`` and
test credentials, so child processes reach it too) and yields the endpoint. The environment
is restored and the server stopped on exit. It raises ``EmulatorError`` when the server
cannot start.

Two differences from a bare ``moto_server``, both on the server side of real HTTP traffic:

* requests are served one at a time. moto checks ``If-None-Match``/``If-Match`` and then
  writes without a lock, so two racing conditional PUTs could both win; S3 makes the check
  and the write one atomic step, and so does a server that serialises requests.
* ``ignore_conditions=True`` drops the two headers before moto sees them: a service that
  accepts conditional writes and ignores them (as some S3-compatible ones do).
"""

from __future__ import annotations

import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

STARTUP_S = 60.0
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", *CREDENTIALS)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answers


def create_buckets(url: str, buckets: Iterable[str]) -> None:
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=url,
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)


@contextmanager
def running_s3_emulator(*buckets: str, ignore_conditions: bool = False) -> Iterator[str]:
    """Yield ``http://127.0.0.1:PORT`` of a live moto S3 server holding ``buckets``.

    The process environment points botocore at it while the block runs, unless
    ``ignore_conditions`` (that server is reached through ``?endpoint_url=`` instead)."""
    # imported here: this file also runs as the server script, where ``tests`` is no package
    from tests.server_process import free_port, server_process

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, __file__, str(port), *(["--ignore-conditions"] * ignore_conditions)]
    with server_process(
        args, url=url, name="moto S3 server", answers=_answers, env_keys=_ENV_KEYS,
        startup_s=STARTUP_S,
    ):  # fmt: skip
        os.environ.update(CREDENTIALS)
        os.environ.pop("AWS_PROFILE", None)
        if not ignore_conditions:
            os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            os.environ["AWS_ENDPOINT_URL"] = url
        create_buckets(url, buckets)
        yield url


# ---- the server (this file run as a script) ----------------------------------------------

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def one_at_a_time(app: WSGIApp, *, ignore_conditions: bool) -> WSGIApp:
    lock = threading.Lock()

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if ignore_conditions:
            environ.pop("HTTP_IF_NONE_MATCH", None)
            environ.pop("HTTP_IF_MATCH", None)
        with lock:
            return list(app(environ, start_response))  # the whole response inside the lock

    return serve


def main(argv: list[str]) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    port, ignore = int(argv[0]), "--ignore-conditions" in argv[1:]
    app = one_at_a_time(DomainDispatcherApplication(create_backend_app), ignore_conditions=ignore)
    server = make_server(
        "127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler
    )
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
