"""A fake GCE metadata server on 127.0.0.1 (``http.server`` in a thread) for tests.

It answers ``instance/scheduling/preemptible`` and ``instance/preempted``, honours
``wait_for_change=true`` (blocks until ``preempt()`` or ``timeout_sec``), returns ETags, and
refuses requests without ``Metadata-Flavor: Google`` as the real one does. Point code at it
with ``GCE_METADATA_HOST=<server.host>``.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeMetadata:
    def __init__(self, *, preemptible: bool = True) -> None:
        self.preemptible = preemptible
        self.preempted = threading.Event()
        self.closing = threading.Event()
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.waiting = threading.Event()  # a long-poll is parked on us

    def preempt(self) -> None:
        self.preempted.set()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: str, etag: str | None = None) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/text")
                self.send_header("Content-Length", str(len(data)))
                if etag:
                    self.send_header("ETag", etag)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                fake.requests.append(self.path)
                if self.headers.get("Metadata-Flavor") != "Google":
                    self._reply(403, "Missing Metadata-Flavor:Google header.")
                    return
                if url.path == "/computeMetadata/v1/instance/scheduling/preemptible":
                    self._reply(200, "TRUE" if fake.preemptible else "FALSE")
                elif url.path == "/computeMetadata/v1/instance/preempted":
                    if query.get("wait_for_change") == "true":
                        current = "2" if fake.preempted.is_set() else "1"
                        if query.get("last_etag") == current:
                            fake.waiting.set()
                            timeout = float(query.get("timeout_sec", "60"))
                            waited = 0.0
                            while waited < timeout and not fake.preempted.is_set():
                                if fake.closing.wait(0.02):
                                    return
                                waited += 0.02
                    done = fake.preempted.is_set()
                    self._reply(200, "TRUE" if done else "FALSE", "2" if done else "1")
                else:
                    self._reply(404, "not found")

        return Handler

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def fake_metadata(*, preemptible: bool = True) -> Iterator[FakeMetadata]:
    fake = FakeMetadata(preemptible=preemptible)
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.close()
        thread.join(5)
