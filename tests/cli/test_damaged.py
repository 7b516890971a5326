"""Damaged job state, end to end in subprocesses (issue 11): files corrupted by hand in a
tiny job (40 steps, a checkpoint every 5, keep 3, paused at step 17), then the real CLI.

- every checkpoint corrupt: ``resume`` refuses (exit 1) naming them and ``--from-scratch``,
  trains nothing and leaves ``job.json`` as it was; ``--from-scratch`` then starts over;
- checkpoints that verify but do not load (an optimizer file that would need unpickling, an
  unparseable ``model.safetensors``, manifests rewritten to match): quarantined, one warning
  each, the resume falls back to the previous one and ends bit-identical to an
  uninterrupted run;
- ``--from-step`` picks an older checkpoint (exit 2 listing them for a missing one);
- ``repair`` rebuilds a deleted or corrupt ``job.json`` from the newest manifest;
- ``status``/``ls``/``logs``/``plot`` on a read-only mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from colabjob.runner.record import load_record
from colabjob.storage.checkpoints import CheckpointInfo, CheckpointStore
from colabjob.storage.store import open_store
from tests.cli.builders import run_cli, tiny_train_script

pytestmark = pytest.mark.slow

TRAIN = tiny_train_script(
    """
        if session.global_step % 5 == 0:  # committed now: background commits may coalesce
            session.save(final=True)
        if args["at"] is None or os.path.exists(args["marker"]):
            continue
        if session.global_step == args["at"]:
            open(args["marker"], "w").close()
            os.kill(os.getppid(), signal.SIGTERM)  # to the supervisor: stop at the next step
            for _ in range(3000):
                if session.ctx.policy.should_stop() is not None:
                    break
                time.sleep(0.01)
""", optimizer="Adam"
)

SPEC = """
job:
  name: damaged
  kind: python
  entrypoint: damaged_train:main
  args: {{marker: {marker}, at: {at}}}
training: {{max_steps: 40, log_every_steps: 1}}
checkpoint: {{every_steps: null, every_minutes: null, keep: 3}}
budget: {{platform: local}}
"""


class Evil:
    """Unpickling this would run a command: it must never be executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _env(root: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{root}:{Path.cwd()}", "OMP_NUM_THREADS": "1"}


def _make_job(root: Path, *, at: int | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "damaged_train.py").write_text(TRAIN)
    spec = root / "job.yaml"
    spec.write_text(SPEC.format(marker=root / "marker", at="null" if at is None else at))
    url = root / "job"
    out = run_cli("start", str(spec), "--storage", str(url), env=_env(root))
    assert out.returncode == (0 if at is None else 75), out.stdout + out.stderr
    return url


def _checkpoints(url: Path) -> list[CheckpointInfo]:
    return CheckpointStore(open_store(url)).list()


def _final_weights(url: Path) -> str:
    newest = _checkpoints(url)[-1]
    assert newest.step == 40
    return str(newest.files["model.safetensors"]["sha256"])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The final weights of the same job run without interruption."""
    return _final_weights(_make_job(tmp_path_factory.mktemp("baseline"), at=None))


@pytest.fixture(scope="module")
def paused_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paused")
    url = _make_job(root, at=16)
    assert [i.step for i in _checkpoints(url)] == [10, 15, 17]
    return root


@pytest.fixture
def paused(paused_template: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the job paused at step 17 (checkpoints 10, 15, 17), and its env."""
    root = tmp_path / "w"
    shutil.copytree(paused_template, root)
    return root / "job", _env(root)


def _damage(url: Path, info: CheckpointInfo, name: str, data: bytes, *, consistent: bool) -> None:
    """Replace one file of a checkpoint; ``consistent``: rewrite its manifest entry too, so
    the checkpoint still verifies (what a buggy writer or a careful attacker leaves)."""
    ckpt = url / info.prefix
    (ckpt / name).write_bytes(data)
    if consistent:
        doc = json.loads((ckpt / "manifest.json").read_bytes())
        doc["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (ckpt / "manifest.json").write_bytes(json.dumps(doc, indent=1, sort_keys=True).encode())


def _truncate(url: Path, info: CheckpointInfo, name: str = "model.safetensors") -> None:
    path = url / info.prefix / name
    path.write_bytes(path.read_bytes()[:20])


def _optimizer_file(info: CheckpointInfo) -> str:
    names = sorted(info.files)
    return "optimizer.pt" if "optimizer.pt" in names else next(
        n for n in names if n.startswith("optimizer")
    )


def _assert_reported_once(output: str, dirname: str) -> None:
    assert output.count(f"quarantined to quarantine/{dirname}/") == 1, output
    assert "CorruptCheckpointWarning" not in output  # no raw `warnings` line


def test_every_checkpoint_corrupt_refuses_then_from_scratch_starts_over(
    paused: tuple[Path, dict[str, str]], baseline: str
) -> None:
    url, env = paused
    infos = _checkpoints(url)
    for info in infos:
        _truncate(url, info)
    record_before = (url / "job.json").read_bytes()
    dirs_before = sorted(os.listdir(url / "ckpt"))

    out = run_cli("resume", str(url), env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "starting from step 0" not in out.stdout + out.stderr
    assert "refusing to start over silently" in out.stderr
    assert "step 17" in out.stderr and "--from-scratch" in out.stderr
    for info in infos:
        assert info.dirname in out.stderr
        _assert_reported_once(out.stdout + out.stderr, info.dirname)
    assert (url / "job.json").read_bytes() == record_before  # nothing retrained or recorded
    assert sorted(os.listdir(url / "ckpt")) == dirs_before

    out = run_cli("resume", str(url), "--from-scratch", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _final_weights(url) == baseline  # a fresh start is the uninterrupted run
    for info in infos:  # the damaged checkpoints are kept for a post-mortem
        assert (url / "quarantine" / info.dirname / "manifest.json").exists()
        assert (url / info.prefix / "model.safetensors").exists()


def test_bit_flipped_checkpoints_refuse_and_keep_the_recorded_progress(
    paused: tuple[Path, dict[str, str]],
) -> None:
    url, env = paused
    infos = _checkpoints(url)
    for info in infos:  # same size: only the download's sha256 check sees it
        path = url / info.prefix / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))
    out = run_cli("resume", str(url), env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "--from-scratch" in out.stderr and "starting from step 0" not in out.stdout
    assert all(info.dirname in out.stderr for info in infos)
    record = load_record(open_store(url))
    assert record.committed_step == 17  # the next resume refuses just the same
    assert _checkpoints(url) == []


def test_checkpoints_that_do_not_load_are_quarantined_and_the_resume_falls_back(
    paused: tuple[Path, dict[str, str]], baseline: str, tmp_path: Path
) -> None:
    url, env = paused
    ten, fifteen, seventeen = _checkpoints(url)
    pwned = tmp_path / "pwned"
    _damage(url, seventeen, _optimizer_file(seventeen), pickle.dumps(Evil(pwned)), consistent=True)
    _damage(url, fifteen, "model.safetensors", b"\x00" * 64 + b"not safetensors", consistent=True)
    assert CheckpointStore(open_store(url)).latest(verify="full") == seventeen  # it verifies

    out = run_cli("resume", str(url), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not pwned.exists()  # the pickle was refused, never executed
    for bad in (seventeen, fifteen):
        _assert_reported_once(out.stdout + out.stderr, bad.dirname)
        reason = json.loads((url / "quarantine" / bad.dirname / "reason.json").read_text())
        assert reason["problem"].startswith("does not load")
    assert f"resumed from checkpoint step {ten.step}" in out.stdout + out.stderr
    assert _final_weights(url) == baseline
    assert load_record(open_store(url)).history[-1].first_step == ten.step == 10


def test_from_step_resumes_from_an_older_checkpoint(
    paused: tuple[Path, dict[str, str]], baseline: str
) -> None:
    url, env = paused
    _, fifteen, seventeen = _checkpoints(url)
    out = run_cli("resume", str(url), "--from-step", "3", env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "available: step 10" in out.stderr and "step 17" in out.stderr

    out = run_cli("resume", str(url), "--from-step", "10", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from checkpoint step 10" in out.stdout + out.stderr
    assert _final_weights(url) == baseline
    for newer in (fifteen, seventeen):  # set aside, not deleted: said so, files kept
        assert newer.dirname in out.stderr
        reason = json.loads((url / "quarantine" / newer.dirname / "reason.json").read_text())
        assert reason["problem"].startswith("superseded")
        assert (url / newer.prefix / "model.safetensors").exists()


def test_repair_rebuilds_a_deleted_or_corrupt_job_json(
    paused: tuple[Path, dict[str, str]], baseline: str
) -> None:
    url, env = paused
    before = load_record(open_store(url))
    out = run_cli("repair", str(url), env=env)
    assert out.returncode == 2 and "--force" in out.stderr  # a valid record is left alone

    (url / "job.json").unlink()
    out = run_cli("status", str(url), env=env)
    assert out.returncode == 2
    out = run_cli("repair", str(url), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "from checkpoint step 17" in out.stdout and "job.json was missing" in out.stdout
    rebuilt = load_record(open_store(url))
    assert (rebuilt.job_id, rebuilt.config, rebuilt.config_hash) == (
        before.job_id,
        before.config,
        before.config_hash,
    )
    assert rebuilt.committed_step == 17 and rebuilt.epoch >= 1

    (url / "job.json").write_bytes(b'{"job_id": "damaged", "state": ')  # cut mid-write
    out = run_cli("resume", str(url), env=env)
    assert out.returncode != 0 and "colabjob repair" in out.stderr
    out = run_cli("repair", str(url), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    backups = [p for p in os.listdir(url) if p.startswith("job.json.corrupt-")]
    assert len(backups) == 1 and (url / backups[0]).read_bytes().endswith(b'"state": ')

    out = run_cli("resume", str(url), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from checkpoint step 17" in out.stdout + out.stderr
    assert _final_weights(url) == baseline


def _mount_read_only(src: Path, dst: Path) -> bool:
    dst.mkdir()
    for argv in (
        ["mount", "--bind", str(src), str(dst)],
        ["mount", "-o", "remount,ro,bind", str(dst)],
    ):
        if subprocess.run(argv, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(dst)], capture_output=True)
            return False
    return True


def test_read_only_commands_work_on_read_only_storage(
    paused: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    url, env = paused
    ro = tmp_path / "ro"
    if not _mount_read_only(url.parent, ro):
        pytest.skip("this sandbox cannot make a read-only bind mount (needs root and mount)")
    try:
        job = ro / "job"
        with pytest.raises(OSError):
            (job / "probe").write_bytes(b"x")  # really read-only, even for root
        out = run_cli("status", str(job), "--json", env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["checkpoint_step"] == 17
        out = run_cli("ls", str(ro), env=env)
        assert out.returncode == 0 and "suspended  17/40" in out.stdout, out.stderr
        out = run_cli("logs", str(job), env=env)
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.splitlines()) >= 17
        png = tmp_path / "loss.png"
        out = run_cli("plot", str(job), "-o", str(png), env=env)
        assert out.returncode == 0 and png.exists(), out.stderr
        out = run_cli("resume", str(job), env=env)  # writing needs a writable store
        assert out.returncode != 0 and "Read-only file system" in out.stderr, out.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert load_record(open_store(url)).committed_step == 17
