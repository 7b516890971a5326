"""Kaggle kernels (issue 14): ``colabjob kaggle push`` and the ``--chain`` of versions.

The metadata field by field against Kaggle's documented kernel-metadata fields; the kernel's
script run for real with a fake ``kaggle_secrets`` and pip and a stub ``colabjob`` (secrets
reach the environment and a 0600 key file, never the code); the push through a stub
``kaggle`` on PATH that logs its argv and keeps the folder it was given, on a job in the GCS
emulator; a job off GCS refused (exit 2); and the chain stopping at its version limit and at
the stated weekly GPU quota.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import colabjob
from colabjob.jobs.policy import StopReason
from colabjob.runner.handoff.kaggle import (
    CODE_FILE,
    METADATA_FILE,
    KaggleKernel,
    kernel_code,
    kernel_metadata,
)
from colabjob.runner.handoff.kaggle_chain import (
    MIN_SESSION_S,
    chain_decision,
    continue_on_kaggle,
    gpu_seconds_used,
    push_kernel,
)
from colabjob.runner.record import JobRecord, Segment, load_record, update_record
from colabjob.storage.store import open_store
from tests.cli.builders import run_main
from tests.runner.test_handoff import make_job
from tests.runner.vm_stubs import write_exe

HOUR = 3600.0
NOW = 1_800_000_000.0
URL = "gs://bucket/jobs/run1"
KAGGLE_ENV = {"KAGGLE_KERNEL_RUN_TYPE": "Batch"}

KAGGLE_STUB = """#!/bin/bash
for arg in "$@"; do printf '[%s]' "$arg"; done >> "$STUB_LOG"
echo >> "$STUB_LOG"
n=$(wc -l < "$STUB_LOG")
[ "$1 $2 $3" != "kernels push -p" ] || cp -r "$4" "$STUB_LOG.push$n"
[ -z "${STUB_ERR:-}" ] || { echo "$STUB_ERR" >&2; exit 1; }
echo "Kernel version 1 successfully pushed."
"""


def kernel(**kw: Any) -> KaggleKernel:
    args: dict[str, Any] = {"kernel": "alice/colabjob-run1", "job_url": URL, "version": "9.9.9"}
    return KaggleKernel(**{**args, **kw})


# -- metadata and code -----------------------------------------------------------------------
@pytest.mark.parametrize("gpu", [True, False])
def test_metadata_has_kaggles_documented_fields_and_values(gpu: bool) -> None:
    meta = kernel_metadata(kernel(gpu=gpu, datasets=("alice/tiny-corpus",)))
    assert meta == {
        "id": "alice/colabjob-run1",
        "title": "colabjob-run1",
        "code_file": "colabjob_resume.py",
        "language": "python",
        "kernel_type": "script",
        "is_private": "true",
        "enable_gpu": "true" if gpu else "false",
        "enable_tpu": "false",
        "enable_internet": "true",
        "dataset_sources": ["alice/tiny-corpus"],
        "competition_sources": [],
        "kernel_sources": [],
        "model_sources": [],
    }


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"job_url": "/content/jobs/run1"}, "storage that outlives the kernel"),
        ({"job_url": "/kaggle/working/job"}, "storage that outlives the kernel"),
        ({"kernel": "alice"}, "USER/SLUG"),
        ({"kernel": "alice/Big_Name"}, "USER/SLUG"),
        ({"datasets": ("corpus",)}, "--dataset"),
        ({"max_versions": 0}, "--max-versions"),
        ({"weekly_gpu_hours": 0.0}, "--weekly-gpu-hours"),
        ({"extra_packages": ("x'; rm -rf /",)}, "--pip"),
    ],
)
def test_bad_values_are_refused(kw: dict[str, Any], says: str) -> None:
    with pytest.raises(colabjob.errors.ConfigError, match=says.replace("-", r"\-")):
        kernel(**kw)


FAKE_SECRETS = """
import json, os
class UserSecretsClient:
    def get_secret(self, name):
        values = json.loads(os.environ["FAKE_SECRETS"])
        if name not in values:
            raise KeyError(name)
        return values[name]
"""
FAKE_PIP = """import json, os, sys
open(os.environ["STUB_LOG"] + ".pip", "w").write(json.dumps(sys.argv[1:]))
"""
COLABJOB_STUB = """#!/bin/bash
for arg in "$@"; do printf '[%s]' "$arg"; done > "$STUB_LOG.colabjob"
cp "$GOOGLE_APPLICATION_CREDENTIALS" "$STUB_LOG.key"
stat -c %a "$GOOGLE_APPLICATION_CREDENTIALS" > "$STUB_LOG.mode"
echo "${KAGGLE_USERNAME:-none} ${KAGGLE_KEY:-none}" > "$STUB_LOG.token"
exit "${STUB_RC:-0}"
"""


def run_kernel_code(tmp_path: Path, code: str, rc: int) -> subprocess.CompletedProcess[str]:
    fakes = tmp_path / "fakes"
    (fakes / "pip").mkdir(parents=True)
    (fakes / "pip" / "__init__.py").write_text("")
    (fakes / "pip" / "__main__.py").write_text(FAKE_PIP)
    (fakes / "kaggle_secrets.py").write_text(FAKE_SECRETS)
    write_exe(tmp_path / "bin" / "colabjob", COLABJOB_STUB)
    (tmp_path / CODE_FILE).write_text(code)
    secrets = {"GCP_SA_KEY": '{"type": "service_account"}', "KAGGLE_USERNAME": "alice",
               "KAGGLE_KEY": "k3y"}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(fakes), "STUB_LOG": str(tmp_path / "log"),
           "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "STUB_RC": str(rc),
           "FAKE_SECRETS": json.dumps(secrets)}  # fmt: skip
    return subprocess.run(
        [sys.executable, str(tmp_path / CODE_FILE)], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_the_kernel_script_installs_and_resumes_with_secrets_from_kaggle(tmp_path: Path) -> None:
    code = kernel_code(kernel(chain=True, extra_packages=("my-train==1.0",)), budget_s=10 * HOUR)
    ast.parse(code)
    assert "k3y" not in code and "UserSecretsClient" in code
    done = run_kernel_code(tmp_path, code, rc=75)
    assert done.returncode == 0, done.stderr  # a paused job is not a failed version
    log = tmp_path / "log"
    pip = json.loads(Path(f"{log}.pip").read_text())
    assert pip[0] == "install" and pip[-3:] == ["colabjob==9.9.9", "my-train==1.0", "kaggle"]
    argv = Path(f"{log}.colabjob").read_text()
    assert argv == f"[resume][{URL}][--platform][kaggle][--budget][36000s]"
    assert Path(f"{log}.key").read_text() == '{"type": "service_account"}'
    assert Path(f"{log}.mode").read_text().strip() == "600"
    assert Path(f"{log}.token").read_text().strip() == "alice k3y"


def test_without_chain_no_kaggle_token_and_a_failure_fails_the_version(tmp_path: Path) -> None:
    done = run_kernel_code(tmp_path, kernel_code(kernel()), rc=1)
    assert done.returncode == 1
    assert Path(f"{tmp_path / 'log'}.token").read_text().strip() == "none none"
    assert "kaggle" not in json.loads(Path(f"{tmp_path / 'log'}.pip").read_text())


# -- push ------------------------------------------------------------------------------------
class Kaggle:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log = root / "kaggle.log"
        write_exe(root / "bin" / "kaggle", KAGGLE_STUB)
        monkeypatch.setenv("PATH", f"{root / 'bin'}:{os.environ['PATH']}")
        monkeypatch.setenv("STUB_LOG", str(self.log))

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def pushed(self, n: int) -> Path:
        return Path(f"{self.log}.push{n}")


@pytest.fixture
def kaggle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Kaggle:
    return Kaggle(tmp_path, monkeypatch)


def test_cli_push_writes_pushes_and_records_the_settings(
    gcs_bucket: str, kaggle: Kaggle, tmp_path: Path
) -> None:
    url = f"{gcs_bucket}/run1"
    make_job(open_store(url))
    out = run_main("kaggle", "push", url, "--kernel", "alice/colabjob-run1", "--gpu", "--chain",
                   "--dataset", "alice/tiny-corpus", "--dir", str(tmp_path / "k"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert kaggle.calls() == [f"[kernels][push][-p][{tmp_path / 'k'}]"]
    meta = json.loads((kaggle.pushed(1) / METADATA_FILE).read_text())
    assert (meta["enable_gpu"], meta["enable_internet"]) == ("true", "true")
    resume = (kaggle.pushed(1) / CODE_FILE).read_text().split("RESUME = ")[1].splitlines()[0]
    assert ast.literal_eval(resume) == ["--platform", "kaggle", "--budget", "43200s"]  # 12 h
    extras = load_record(open_store(url)).extras["kaggle"]
    assert extras["kernel"] == "alice/colabjob-run1" and extras["chain"] is True
    assert len(extras["pushes"]) == 1 and "GCP_SA_KEY" in out.stdout


def test_cli_refuses_a_local_job_with_exit_2(tmp_path: Path, kaggle: Kaggle) -> None:
    out = run_main("kaggle", "push", str(tmp_path / "job"), "--kernel", "alice/colabjob-run1")
    assert out.returncode == 2
    assert "the job must live on storage that outlives the kernel" in out.stderr
    assert kaggle.calls() == [] and not (tmp_path / "job").exists()


def test_without_the_kaggle_cli_nothing_is_recorded(
    gcs_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{gcs_bucket}/run1"
    make_job(open_store(url))
    monkeypatch.setenv("PATH", str(tmp_path))
    out = run_main("kaggle", "push", url, "--kernel", "alice/colabjob-run1",
                   "--dir", str(tmp_path / "k"))  # fmt: skip
    assert out.returncode == 2 and "pip install kaggle" in out.stderr
    assert "kaggle" not in load_record(open_store(url)).extras


# -- the chain -------------------------------------------------------------------------------
def record(*, pushes: int = 0, kaggle_hours: tuple[float, ...] = (), gpu: bool = True,
           chain: bool = True, max_versions: int = 3) -> JobRecord:  # fmt: skip
    history, t = [], NOW - 6 * 86400.0
    for i, hours in enumerate(kaggle_hours):
        history.append(Segment(session_id=f"s{i}", platform="kaggle", host="k", started_at=t,
                               ended_at=t + hours * HOUR, stop_reason=StopReason.BUDGET))
        t += hours * HOUR + 60
    settings = {**kernel(gpu=gpu, chain=chain, max_versions=max_versions).to_extras(),
                "pushes": [NOW - 1000.0] * pushes}  # fmt: skip
    return JobRecord(job_id="run1", history=tuple(history), extras={"kaggle": settings})


def decide(rec: JobRecord, env: dict[str, str] = KAGGLE_ENV, **kw: Any) -> Any:
    args: dict[str, Any] = {"exit_code": 75, "stop_reason": "budget", "now": NOW}
    return chain_decision(rec, env, job_url=URL, **{**args, **kw})


def test_a_budget_pause_on_kaggle_pushes_the_next_version_with_the_quota_left() -> None:
    step = decide(record(pushes=1, kaggle_hours=(12.0, 8.0)))
    assert step.kernel is not None and step.why == "version 2 of at most 3"
    assert step.budget_s == pytest.approx(10 * HOUR)


@pytest.mark.parametrize(
    ("rec", "kw", "env", "why"),
    [
        (record(pushes=3), {}, KAGGLE_ENV, "3 versions pushed already (--max-versions 3)"),
        (record(kaggle_hours=(12.0, 12.0, 5.5)), {}, KAGGLE_ENV, "29.5 of the stated 30"),
        (record(chain=False), {}, KAGGLE_ENV, "not pushed with --chain"),
        (record(), {}, {}, "not running in a Kaggle kernel"),
        (record(), {"exit_code": 0, "stop_reason": "completed"}, KAGGLE_ENV, "did not pause"),
        (record(), {"exit_code": 1, "stop_reason": "crash"}, KAGGLE_ENV, "did not pause"),
        (record(), {"stop_reason": "stop_request"}, KAGGLE_ENV, "not the session limit's"),
        (record(), {"node_rank": 1}, KAGGLE_ENV, "not rank 0"),
    ],
)
def test_no_next_version(rec: JobRecord, kw: dict[str, Any], env: dict[str, str],
                         why: str) -> None:  # fmt: skip
    step = decide(rec, env, **kw)
    assert step.kernel is None and why in step.why


def test_the_quota_counts_only_the_last_seven_days_and_no_quota_without_gpu() -> None:
    rec = record(kaggle_hours=(12.0, 12.0, 5.5))
    assert gpu_seconds_used(rec, NOW) == pytest.approx(29.5 * HOUR)
    assert gpu_seconds_used(rec, NOW + 86400.0 + 12 * HOUR) < 18 * HOUR  # the first aged out
    assert decide(rec, now=NOW + 2 * 86400.0).kernel is not None
    cpu = decide(record(gpu=False, kaggle_hours=(12.0, 12.0, 12.0)))
    assert cpu.kernel is not None and cpu.budget_s is None
    assert MIN_SESSION_S == HOUR


def test_the_chain_stops_at_its_limit(gcs_bucket: str, kaggle: Kaggle) -> None:
    url = f"{gcs_bucket}/run1"
    store = open_store(url)
    make_job(store)
    push_kernel(url, kernel="alice/colabjob-run1", gpu=True, chain=True, max_versions=3,
                weekly_gpu_hours=30.0, folder=Path(str(kaggle.log) + ".first"))  # fmt: skip
    said: list[str] = []
    pushed = [
        continue_on_kaggle(url, exit_code=75, stop_reason="budget", node_rank=0,
                           env=KAGGLE_ENV, say=said.append)
        for _ in range(4)
    ]
    assert pushed == [True, True, False, False]
    assert len(kaggle.calls()) == 3  # the first push and two versions from the chain
    assert "no next Kaggle version: 3 versions pushed already (--max-versions 3)" in said[-1]
    assert len(load_record(store).extras["kaggle"]["pushes"]) == 3
    meta = json.loads((kaggle.pushed(3) / METADATA_FILE).read_text())
    assert meta == kernel_metadata(kernel(gpu=True, chain=True, max_versions=3,
                                          job_url=url, version=colabjob.__version__))


def test_the_chain_stops_at_the_stated_quota(gcs_bucket: str, kaggle: Kaggle) -> None:
    url = f"{gcs_bucket}/run1"
    store = open_store(url)
    make_job(store)
    push_kernel(url, kernel="alice/colabjob-run1", gpu=True, chain=True, max_versions=20,
                weekly_gpu_hours=13.0, folder=Path(str(kaggle.log) + ".first"))  # fmt: skip
    seg = Segment(session_id="k1", platform="kaggle", host="k", started_at=0.0)

    def twelve_hours(r: JobRecord) -> JobRecord:
        import time

        now = time.time()
        s = Segment(**{**seg.to_dict(), "started_at": now - 12.5 * HOUR, "stop_reason": None})
        return r.begin_segment(s).end_segment(ended_at=now, last_step=20,
                                              stop_reason=StopReason.BUDGET)  # fmt: skip

    update_record(store, twelve_hours)
    said: list[str] = []
    assert not continue_on_kaggle(url, exit_code=75, stop_reason="budget", node_rank=0,
                                  env=KAGGLE_ENV, say=said.append)  # fmt: skip
    assert len(kaggle.calls()) == 1
    assert "12.5 of the stated 13 weekly GPU hours used (--weekly-gpu-hours)" in said[0]


def test_a_failed_push_is_told_and_leaves_the_count(
    gcs_bucket: str, kaggle: Kaggle, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{gcs_bucket}/run1"
    make_job(open_store(url))
    push_kernel(url, kernel="alice/colabjob-run1", chain=True, max_versions=3,
                weekly_gpu_hours=30.0, folder=Path(str(kaggle.log) + ".first"))  # fmt: skip
    monkeypatch.setenv("STUB_ERR", "403 Forbidden")
    said: list[str] = []
    assert not continue_on_kaggle(url, exit_code=75, stop_reason="budget", node_rank=0,
                                  env=KAGGLE_ENV, say=said.append)  # fmt: skip
    assert "could not push the next Kaggle version" in said[0] and "403" in said[0]
    assert len(load_record(open_store(url)).extras["kaggle"]["pushes"]) == 1


# -- a whole run inside a "kernel" -----------------------------------------------------------
SPEC = """
job: {name: kaggle, kind: python, entrypoint: kaggle_train:main}
training: {max_steps: 30, log_every_steps: 1}
checkpoint: {every_steps: 5, every_minutes: null}
budget: {platform: kaggle, limit: 100h}
"""


@pytest.mark.slow
def test_a_paused_segment_in_a_kernel_pushes_the_next_version(
    gcs_bucket: str, kaggle: Kaggle, tmp_path: Path
) -> None:
    from tests.cli.builders import REPO, run_cli
    from tests.runner.test_slurm_requeue import TRAIN

    (tmp_path / "kaggle_train.py").write_text(TRAIN.replace("slurm", "kaggle"))
    (tmp_path / "job.yaml").write_text(SPEC)
    url = f"{gcs_bucket}/run1"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{tmp_path}:{REPO}", **KAGGLE_ENV,
           "STUB_LOG": str(kaggle.log), "OMP_NUM_THREADS": "1", "TEST_STOP": "budget"}  # fmt: skip
    out = run_cli("start", str(tmp_path / "job.yaml"), "--storage", url, env={**env,
                  "TEST_STOP_AT": "4"})  # fmt: skip
    assert out.returncode == 75, out.stderr[-3000:]
    assert kaggle.calls() == []  # not pushed with --chain: nothing to continue

    out = run_main("kaggle", "push", url, "--kernel", "alice/colabjob-run1", "--gpu", "--chain",
                   "--max-versions", "2", "--dir", str(tmp_path / "k"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    out = run_cli("resume", url, env={**env, "TEST_STOP_AT": "9"})
    assert out.returncode == 75, out.stderr[-3000:]
    assert len(kaggle.calls()) == 2 and "pushed the next version of kernel" in out.stderr
    out = run_cli("resume", url, env={**env, "TEST_STOP_AT": "14"})
    assert out.returncode == 75 and len(kaggle.calls()) == 2
    assert "no next Kaggle version: 2 versions pushed already (--max-versions 2)" in out.stderr
    record = load_record(open_store(url))
    assert [s.platform for s in record.history] == ["kaggle"] * 3
