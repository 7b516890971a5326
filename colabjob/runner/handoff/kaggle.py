"""A Kaggle kernel that resumes a job: its metadata, its code, and ``kaggle kernels push``.

``KaggleKernel`` is what ``colabjob kaggle push`` records in the job (``job.json``'s extras
under ``"kaggle"``, no secrets) and what every version of the kernel is rendered from:
``kernel_metadata`` is ``kernel-metadata.json`` with the fields Kaggle's CLI documents (id,
title, code_file, language, kernel_type, is_private, enable_gpu, enable_tpu,
enable_internet, dataset_sources, competition_sources, kernel_sources, model_sources;
booleans as the strings its documentation shows), ``kernel_code`` the Python script:
install colabjob pinned to this version, then ``colabjob resume URL --platform kaggle``.
``write_kernel`` puts both in a folder and ``run_kaggle`` runs the official ``kaggle`` CLI on
it (``kaggle kernels push -p DIR``).

The job must live on storage that outlives the kernel: a kernel's disk (``/kaggle/working``)
comes back only as that version's read-only output, and an attached dataset is read-only
(``/kaggle/input/SLUG``: fine for the data, not for the job), so the job URL is ``gs://``.
Credentials never enter the code: at run time it reads Kaggle Secrets
(``kaggle_secrets.UserSecretsClient``) ``GCP_SA_KEY`` (a service-account JSON key: written to
a 0600 file under /tmp, named by ``GOOGLE_APPLICATION_CREDENTIALS``) and, for ``--chain``,
``KAGGLE_USERNAME``/``KAGGLE_KEY`` (environment only), which the next push needs.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colabjob.errors import ConfigError, KaggleNotFoundError
from colabjob.runner.handoff.gcloud import Runner, run_cli

__all__ = [
    "CODE_FILE",
    "DEFAULT_MAX_VERSIONS",
    "DEFAULT_WEEKLY_GPU_HOURS",
    "EXTRAS_KEY",
    "KAGGLE_INSTALL",
    "METADATA_FILE",
    "SECRET_GCP_KEY",
    "KaggleKernel",
    "kernel_code",
    "kernel_metadata",
    "push_argv",
    "run_kaggle",
    "write_kernel",
]

KAGGLE_INSTALL = "pip install kaggle"
EXTRAS_KEY = "kaggle"  # where job.json's extras keep the kernel settings
METADATA_FILE = "kernel-metadata.json"
CODE_FILE = "colabjob_resume.py"
DEFAULT_MAX_VERSIONS = 20
DEFAULT_WEEKLY_GPU_HOURS = 30.0
SECRET_GCP_KEY = "GCP_SA_KEY"
SECRET_KAGGLE = ("KAGGLE_USERNAME", "KAGGLE_KEY")
PUSH_TIMEOUT_S = 600.0

_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}/[a-z0-9][a-z0-9-]{3,48}[a-z0-9]")
_PACKAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-\[\],<>=!~ ]*")


def _check_ref(what: str, value: str) -> None:
    if not _REF.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is not Kaggle's USER/SLUG",
            hint="e.g. alice/colabjob-run1: a slug of 5-50 lowercase letters, digits and '-'",
        )


@dataclass(frozen=True, kw_only=True)
class KaggleKernel:
    """The kernel that resumes ``job_url``. Validated on construction (``ConfigError``)."""

    kernel: str  # USER/SLUG
    job_url: str  # gs://
    version: str  # the colabjob version the kernel installs
    gpu: bool = False
    chain: bool = False
    max_versions: int = DEFAULT_MAX_VERSIONS
    weekly_gpu_hours: float = DEFAULT_WEEKLY_GPU_HOURS
    datasets: tuple[str, ...] = ()
    extra_packages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_ref("--kernel", self.kernel)
        if not self.job_url.startswith("gs://"):
            raise ConfigError(
                f"a Kaggle kernel cannot keep the job at {self.job_url!r}: the job must live on "
                "storage that outlives the kernel",
                hint="put it on GCS (`colabjob handoff JOB --to gs://BUCKET/PATH --dry-run` "
                "shows the copy; or start it there with --storage gs://...); a Kaggle dataset "
                "attached with --dataset is read-only: use it for the data, not the job",
            )
        if self.max_versions < 1:
            raise ConfigError(f"--max-versions must be at least 1, got {self.max_versions}")
        if not self.weekly_gpu_hours > 0:
            raise ConfigError(
                f"--weekly-gpu-hours must be positive, got {self.weekly_gpu_hours}",
                hint="the GPU hours Kaggle gives you a week (30 for most accounts)",
            )
        for ref in self.datasets:
            _check_ref("--dataset", ref)
        for value in (self.version, *self.extra_packages):
            if not _PACKAGE.fullmatch(value):
                raise ConfigError(f"--pip {value!r} is not a package requirement")
        if any(c in self.job_url for c in "\n\r\"'\\"):
            raise ConfigError(f"{self.job_url!r} holds a quote, backslash or newline")

    @property
    def slug(self) -> str:
        return self.kernel.split("/", 1)[1]

    def to_extras(self) -> dict[str, Any]:
        """What ``job.json`` keeps (settings only; never a secret)."""
        return {
            "kernel": self.kernel,
            "gpu": self.gpu,
            "chain": self.chain,
            "max_versions": self.max_versions,
            "weekly_gpu_hours": self.weekly_gpu_hours,
            "datasets": list(self.datasets),
            "extra_packages": list(self.extra_packages),
        }

    @classmethod
    def from_extras(cls, d: Mapping[str, Any], *, job_url: str, version: str) -> KaggleKernel:
        return cls(
            kernel=str(d["kernel"]),
            job_url=job_url,
            version=version,
            gpu=bool(d.get("gpu", False)),
            chain=bool(d.get("chain", False)),
            max_versions=int(d.get("max_versions", DEFAULT_MAX_VERSIONS)),
            weekly_gpu_hours=float(d.get("weekly_gpu_hours", DEFAULT_WEEKLY_GPU_HOURS)),
            datasets=tuple(d.get("datasets", ())),
            extra_packages=tuple(d.get("extra_packages", ())),
        )


def _flag(value: bool) -> str:
    return "true" if value else "false"  # as Kaggle's kernel-metadata documentation writes them


def kernel_metadata(kernel: KaggleKernel) -> dict[str, Any]:
    """``kernel-metadata.json``: private, a Python script, internet on (pip, GCS)."""
    return {
        "id": kernel.kernel,
        "title": kernel.slug,  # Kaggle derives the slug from the title: keep them one
        "code_file": CODE_FILE,
        "language": "python",
        "kernel_type": "script",
        "is_private": _flag(True),
        "enable_gpu": _flag(kernel.gpu),
        "enable_tpu": _flag(False),
        "enable_internet": _flag(True),
        "dataset_sources": list(kernel.datasets),
        "competition_sources": [],
        "kernel_sources": [],
        "model_sources": [],
    }


_CODE = '''\
# Written by `colabjob kaggle push` (colabjob {version}): resumes the job below from its newest
# committed checkpoint. No credentials in this file: they come from Kaggle Secrets (in the
# editor: Add-ons > Secrets, attached to this notebook) when it runs:
#   {gcp_key}: a GCP service-account JSON key that may read and write the job's bucket;
#   {kaggle_user} and {kaggle_key}: your Kaggle API token, for --chain (the next version).
import os
import subprocess
import sys
import tempfile

JOB_URL = {job_url}
RESUME = {resume}
PACKAGES = {packages}
DATASETS = {datasets}  # attached read-only under /kaggle/input/<slug>


def secret(name):
    try:
        from kaggle_secrets import UserSecretsClient

        return UserSecretsClient().get_secret(name)
    except Exception as e:  # not attached, or not on Kaggle
        print(f"colabjob: Kaggle secret {{name}} unavailable ({{type(e).__name__}})", flush=True)
        return None


key = secret({gcp_key!r})
if key:
    fd, path = tempfile.mkstemp(prefix="gcp-key-", suffix=".json", dir="/tmp")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(key)
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = path
for name in {kaggle_names!r} if {chain} else ():
    value = secret(name)
    if value:
        os.environ[name] = value
subprocess.check_call(
    [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PACKAGES]
)
rc = subprocess.call(["colabjob", "resume", JOB_URL, *RESUME])
print(f"colabjob: exit {{rc}} (0 done, 75 paused, 1 failed, 2 usage)", flush=True)
if rc not in (0, 75):  # a paused job is not a failed version
    sys.exit(rc)
'''


def kernel_code(kernel: KaggleKernel, *, budget_s: float | None = None) -> str:
    """The kernel's script; ``budget_s`` caps the session (the GPU quota left)."""
    packages = [f"colabjob=={kernel.version}", *kernel.extra_packages]
    if kernel.chain:
        packages.append("kaggle")  # the next version is pushed from inside this one
    resume = ["--platform", "kaggle"]
    if budget_s is not None:
        resume += ["--budget", f"{int(budget_s)}s"]
    return _CODE.format(
        version=kernel.version,
        gcp_key=SECRET_GCP_KEY,
        kaggle_user=SECRET_KAGGLE[0],
        kaggle_key=SECRET_KAGGLE[1],
        kaggle_names=SECRET_KAGGLE,
        chain=kernel.chain,
        job_url=json.dumps(kernel.job_url),
        resume=json.dumps(resume),
        packages=json.dumps(packages),
        datasets=json.dumps(list(kernel.datasets)),
    )


def write_kernel(kernel: KaggleKernel, folder: Path, *, budget_s: float | None = None) -> Path:
    """``folder`` holding ``kernel-metadata.json`` and the script (what ``push`` uploads)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(kernel_metadata(kernel), indent=2) + "\n"
    (folder / METADATA_FILE).write_text(meta, encoding="utf-8")
    (folder / CODE_FILE).write_text(kernel_code(kernel, budget_s=budget_s), encoding="utf-8")
    return folder


def push_argv(folder: Path | str, *, kaggle: str = "kaggle") -> list[str]:
    return [kaggle, "kernels", "push", "-p", str(folder)]


def run_kaggle(
    argv: Sequence[str], *, runner: Runner = subprocess.run, timeout: float = PUSH_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run the ``kaggle`` CLI (argv[0] on PATH): ``KaggleNotFoundError`` when it is missing,
    ``HandoffError`` (exit 1) when it fails."""
    missing = KaggleNotFoundError(
        f"{argv[0]} (Kaggle's CLI) is not installed or not on PATH",
        hint=f"{KAGGLE_INSTALL}, and put your API token in ~/.kaggle/kaggle.json (or "
        "KAGGLE_USERNAME/KAGGLE_KEY); or pass --dry-run to only write the kernel",
    )
    hint = (
        "check the token (`kaggle kernels list --mine`) and that the account is "
        "phone-verified (GPU and internet need it); then push again"
    )
    return run_cli(argv, missing=missing, runner=runner, timeout=timeout, failed_hint=hint)
