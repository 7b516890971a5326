"""A local test server as a child process: the part the GCS and S3 emulators share.

``server_process(argv, url=..., name=..., answers=...)`` starts ``argv`` with its output in a
log file, waits until ``answers(url)`` is true (``EmulatorError`` with the log's tail when it
exits or stays silent for ``startup_s``), and on exit puts ``env_keys`` back as they were
(the caller points clients at the server through the environment) and stops the server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


class EmulatorError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path, *, name: str,
    answers: Callable[[str], bool], startup_s: float,
) -> None:  # fmt: skip
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmulatorError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if answers(url):
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)  # polling a starting server
    proc.kill()
    raise EmulatorError(f"{name} did not answer in {startup_s}s: {log.read_text()[-2000:]}")


@contextmanager
def server_process(
    argv: Sequence[str], *, url: str, name: str, answers: Callable[[str], bool],
    env_keys: Sequence[str], startup_s: float = 20.0,
) -> Iterator[None]:  # fmt: skip
    """Run ``argv`` until the block ends, ready once ``answers(url)``; see the module."""
    log = Path(tempfile.mkdtemp(prefix="test-server-")) / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(list(argv), stdout=logf, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in env_keys}
    try:
        _wait_ready(proc, url, log, name=name, answers=answers, startup_s=startup_s)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
