"""Stand-ins for what a GCE VM has, so the handoff startup script runs here for real.

``FakeVm`` lays out a temp directory: a stub ``shutdown`` (records its argv), a stub
``nvidia-smi`` (exit code chosen per test), a stub system ``python3`` whose ``-m venv``
creates a venv of stubs (``python`` answering the installed version and recording
``-m pip install``, which "installs" by writing that version), and a ``colabjob`` stub: bash
recording its argv and exiting with ``STUB_RC`` (or, with ``STUB_WAIT_TERM=1``, waiting for
SIGTERM and exiting 75 like a runner that committed its checkpoint), or the Python one in
``colabjob_probe.py`` that reads the job from GCS. A stub ``gcloud`` records its argv (one
``[arg]`` list a line) and exits with ``STUB_GCLOUD_RC`` (the managed-instance-group
resize). ``run()`` executes a rendered script with the test hooks the script documents
pointing here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

BASH_COLABJOB = """#!/bin/bash
printf '%s\\n' "$*" >> "$STUB_LOG.colabjob"
for arg in "$@"; do printf '[%s]' "$arg"; done >> "$STUB_LOG.argv"
echo >> "$STUB_LOG.argv"
env | grep -E '^(GCE_METADATA_HOST|STORAGE_EMULATOR_HOST|PYTHONUNBUFFERED)=' \\
  | sort >> "$STUB_LOG.env"
echo "colabjob stub: training output line"
if [ "${STUB_WAIT_TERM:-0}" = 1 ]; then
  trap 'echo got-term >> "$STUB_LOG.colabjob"; echo "checkpoint committed"; exit 75' TERM
  touch "$STUB_LOG.ready"
  while :; do sleep 1 & wait $!; done
fi
exit "${STUB_RC:-0}"
"""

# "python" inside the venv and the system "python3": one stub for both.
PYTHON_STUB = """#!/bin/bash
here="$(cd "$(dirname "$0")" && pwd)"
printf 'python %s\\n' "$*" >> "$STUB_LOG.python"
if [ "$1" = "-c" ]; then
  cat "$here/../installed-version" 2>/dev/null || exit 1
elif [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  cp "$0" "$3/bin/python"
  cp "$STUB_COLABJOB" "$3/bin/colabjob"
elif [ "$1 $2" = "-m pip" ]; then
  printf '%s\\n' "$*" >> "$STUB_LOG.pip"
  [ "${STUB_PIP_RC:-0}" = 0 ] || exit "$STUB_PIP_RC"
  for arg in "$@"; do
    case "$arg" in colabjob==*) printf '%s\\n' "${arg#colabjob==}" > "$here/../installed-version";;
    esac
  done
fi
exit 0
"""

SHUTDOWN_STUB = """#!/bin/bash
printf '%s\\n' "$*" >> "$STUB_LOG.shutdown"
"""

GCLOUD_STUB = """#!/bin/bash
for arg in "$@"; do printf '[%s]' "$arg"; done >> "$STUB_LOG.gcloud"
echo >> "$STUB_LOG.gcloud"
exit "${STUB_GCLOUD_RC:-0}"
"""

NVIDIA_SMI_STUB = """#!/bin/bash
echo "GPU 0: NVIDIA L4 (UUID: GPU-stub)"
exit "${STUB_GPU_RC:-0}"
"""


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


class FakeVm:
    """A temp-dir "VM". ``installed`` pre-creates a venv with colabjob ``installed``."""

    def __init__(self, root: Path, *, colabjob: str = "bash", installed: str | None = None):
        self.root = root
        self.bin = root / "bin"
        self.logs = root / "stub"
        self.venv = root / "opt" / "venv"
        self.log_file = root / "var" / "log" / "colabjob-startup.log"
        write_exe(self.bin / "shutdown", SHUTDOWN_STUB)
        write_exe(self.bin / "nvidia-smi", NVIDIA_SMI_STUB)
        write_exe(self.bin / "gcloud", GCLOUD_STUB)
        self.system_python = write_exe(root / "system" / "python3", PYTHON_STUB)
        if colabjob == "bash":
            self.colabjob = write_exe(root / "stubs" / "colabjob", BASH_COLABJOB)
        else:  # the Python probe, run by this interpreter (it imports colabjob)
            probe = (HERE / "colabjob_probe.py").read_text()
            self.colabjob = write_exe(
                root / "stubs" / "colabjob", f"#!{sys.executable}\n{probe}"
            )
        if installed is not None:
            write_exe(self.venv / "bin" / "python", PYTHON_STUB)
            shutil.copy(self.colabjob, self.venv / "bin" / "colabjob")
            (self.venv / "installed-version").write_text(installed + "\n")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COLABJOB_", "STUB_"))}
        env.update(
            PATH=f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}",
            PYTHONPATH=str(REPO),
            STUB_LOG=str(self.logs),
            STUB_COLABJOB=str(self.colabjob),
            COLABJOB_LOG_FILE=str(self.log_file),
            COLABJOB_VENV=str(self.venv),
            COLABJOB_PYTHON=str(self.system_python),
            COLABJOB_SHUTDOWN_CMD=f"{self.bin / 'shutdown'} -h now",
            COLABJOB_GPU_WAIT_S="0",
            COLABJOB_RETRY_SLEEP_S="0",
            GCE_METADATA_HOST="127.0.0.1:9",  # nothing listens: "not preempted"
        )
        env.update(extra)
        return env

    def write_script(self, script: str) -> Path:
        return write_exe(self.root / "startup-script.sh", script)

    def popen(self, script: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", str(self.write_script(script))],
            env=self.env(**extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, script: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(self.write_script(script))],
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stub_log(self, what: str) -> str:
        path = Path(f"{self.logs}.{what}")
        return path.read_text() if path.exists() else ""

    @property
    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    @property
    def shutdowns(self) -> list[str]:
        return self.stub_log("shutdown").splitlines()

    @property
    def gcloud_calls(self) -> list[str]:
        return self.stub_log("gcloud").splitlines()


def stub_env_lines(vm: FakeVm) -> Mapping[str, str]:
    out: dict[str, str] = {}
    for line in vm.stub_log("env").splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out
