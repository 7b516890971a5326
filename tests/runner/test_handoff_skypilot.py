"""``colabjob handoff --engine skypilot``: the task SkyPilot's own parser reads, the launch
through a stub ``sky`` on PATH, and the shared checks and verified copy of the GCE path.

SkyPilot itself lives in its own venv (``make setup`` makes ``.venv-sky``; its pinned click
conflicts with huggingface_hub's), and ``sky.Task.from_yaml`` runs there in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest

import colabjob
from colabjob.cli.handoff import cmd_handoff, configure_parser
from colabjob.errors import ConfigError, HandoffError, SkyNotFoundError
from colabjob.runner.handoff.skypilot import SkyTask, handoff_skypilot, task_yaml
from colabjob.runner.handoff.transfer import check_not_moved, read_moved
from colabjob.runner.record import load_record
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.runner.test_handoff import drive, make_job, no_runner  # noqa: F401 (fixture)
from tests.runner.vm_stubs import REPO, write_exe

SKY_PYTHON = Path(os.environ.get("COLABJOB_SKYPILOT_PYTHON", REPO / ".venv-sky" / "bin" / "python"))

READ_TASK = """
import json, sys
import sky
task = sky.Task.from_yaml(sys.argv[1])
(res,) = task.resources
print(json.dumps({
    "name": task.name, "num_nodes": task.num_nodes, "envs": dict(task.envs),
    "use_spot": res.use_spot, "cloud": str(res.cloud).lower(),
    "accelerators": res.accelerators, "setup": task.setup, "run": task.run,
}))
"""

SKY_STUB = """#!/bin/bash
for arg in "$@"; do printf '[%s]' "$arg"; done >> "$SKY_LOG"
echo >> "$SKY_LOG"
cp "${@: -1}" "$SKY_LOG.yaml"
[ -z "${SKY_ERR:-}" ] || { echo "$SKY_ERR" >&2; exit 1; }
echo "Managed job ID: 1"
"""


def skypilot_reads(path: Path) -> dict[str, object]:
    """The task as SkyPilot's own parser understands it."""
    if not SKY_PYTHON.exists():
        pytest.fail(f"SkyPilot is not installed at {SKY_PYTHON}: run `make setup` (.venv-sky)")
    done = subprocess.run(
        [str(SKY_PYTHON), "-c", READ_TASK, str(path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(path.parent)},
    )
    assert done.returncode == 0, done.stderr
    parsed: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return parsed


@pytest.mark.slow
@pytest.mark.parametrize(
    ("gpus", "nodes", "spot"), [("L4:1", 1, True), ("A100:8", 2, False), (None, 1, False)]
)
def test_skypilot_parses_the_task(
    gpus: str | None, nodes: int, spot: bool, tmp_path: Path
) -> None:
    task = SkyTask(name="colabjob-run-1", job_url="gs://b/jobs/run1", version="9.9.9",
                   gpus=gpus, nodes=nodes, spot=spot, extra_packages=("my-train==1.0",))
    path = tmp_path / "task.yaml"
    path.write_text(task_yaml(task))
    got = skypilot_reads(path)
    assert got["name"] == "colabjob-run-1" and got["num_nodes"] == nodes
    assert got["use_spot"] is spot and got["cloud"] == "gcp"
    count = gpus.split(":")[1] if gpus else None
    assert got["accelerators"] == ({gpus.split(":")[0]: int(count)} if gpus and count else None)
    assert got["envs"] == {"COLABJOB_JOB_URL": "gs://b/jobs/run1", "PYTHONUNBUFFERED": "1"}
    setup, run = str(got["setup"]), str(got["run"])
    assert "colabjob==9.9.9 my-train==1.0" in setup
    assert ("download.pytorch.org/whl/cpu" in setup) is (gpus is None)
    assert 'colabjob resume "$COLABJOB_JOB_URL" --platform gce' in run
    multi = '--nnodes "$SKYPILOT_NUM_NODES" --node-rank "$SKYPILOT_NODE_RANK"'
    assert (multi in run) is (nodes > 1)
    assert "sleep 300" in run  # a preempted VM waits to be taken: SkyPilot then relaunches
    assert not any(s in task_yaml(task).lower() for s in ("token", "secret", "key_file"))


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("gpus", "L4 x1", "NAME:COUNT"),
        ("nodes", 0, "not in 1..64"),
        ("nodes", 65, "not in 1..64"),
        ("name", "Run_1", "job name"),
        ("job_url", "/content/drive/j", "not a gs:// URL"),
        ("cloud", "G C P", "cloud name"),
        ("extra_packages", ("git+https://u:tok@host/x",), "credential"),
    ],
)
def test_bad_values_are_refused(field: str, value: object, says: str) -> None:
    fields: dict[str, object] = {"name": "colabjob-j", "job_url": "gs://b/j", "version": "1"}
    fields[field] = value
    with pytest.raises(ConfigError, match=says):
        SkyTask(**fields)  # type: ignore[arg-type]


class Sky:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log = root / "sky.log"
        write_exe(root / "sky-bin" / "sky", SKY_STUB)
        monkeypatch.setenv("PATH", f"{root / 'sky-bin'}:{os.environ['PATH']}")
        monkeypatch.setenv("SKY_LOG", str(self.log))
        monkeypatch.delenv("SKY_ERR", raising=False)

    @property
    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def sky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sky:
    return Sky(tmp_path, monkeypatch)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="colabjob")
    configure_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["handoff", *argv])


@pytest.mark.gcs
def test_cli_dry_run_prints_the_task_and_command_and_changes_nothing(
    gcs_bucket: str, tmp_path: Path, sky: Sky, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(gcs_bucket)
    make_job(store)
    before = store.list()
    args = parse(gcs_bucket, "--engine", "skypilot", "--gpus", "L4:1", "--nodes", "2", "--spot",
                 "--dry-run", "--script-out", str(tmp_path / "t.yaml"))
    assert cmd_handoff(args) == 0
    out = capsys.readouterr().out
    assert "accelerators: L4:1" in out and f"COLABJOB_JOB_URL: {gcs_bucket}" in out
    assert f"sky jobs launch -n colabjob-run-1 -y {tmp_path / 't.yaml'}" in out
    assert "# dry run: nothing was copied, marked or launched" in out
    assert sky.calls == [] and store.list() == before


@pytest.mark.gcs
def test_a_drive_job_is_copied_then_launched(drive: Path, gcs_bucket: str, sky: Sky) -> None:  # noqa: F811
    src = open_store(str(drive / "jobs" / "run1"))
    make_job(src)
    plan = handoff_skypilot(str(drive / "jobs" / "run1"), gpus="L4:1", spot=True, to=gcs_bucket,
                            name="my-run")
    assert plan.launched and plan.copy_needed and plan.transfer is not None
    marker = read_moved(src)
    assert marker is not None and marker.moved_to == gcs_bucket
    latest = CheckpointStore(open_store(gcs_bucket)).latest(verify="full")
    assert latest is not None and latest.step == 20
    assert sky.calls == [f"[jobs][launch][-n][my-run][-y][{plan.task_path}]"]
    launched = Path(f"{sky.log}.yaml").read_text()
    assert f"COLABJOB_JOB_URL: {gcs_bucket}" in launched
    assert f"colabjob=={colabjob.__version__}" in launched


def test_a_job_off_gcs_needs_to(drive: Path) -> None:  # noqa: F811
    make_job(open_store(str(drive / "j")))
    with pytest.raises(ConfigError, match="not on GCS") as info:
        handoff_skypilot(str(drive / "j"), dry_run=True, runner=no_runner)
    assert "--to gs://" in str(info.value.hint)


@pytest.mark.gcs
def test_without_sky_nothing_moves_and_the_hint_says_how_to_install(
    drive: Path, gcs_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    src = open_store(str(drive / "j"))
    make_job(src)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SkyNotFoundError) as info:
        handoff_skypilot(str(drive / "j"), to=gcs_bucket)
    assert info.value.exit_code == 2 and 'pip install "skypilot[gcp]"' in str(info.value.hint)
    check_not_moved(src)  # not marked
    assert open_store(gcs_bucket).list() == []


@pytest.mark.gcs
def test_a_failed_launch_says_the_job_is_on_gcs(gcs_bucket: str, sky: Sky,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    make_job(open_store(gcs_bucket))
    monkeypatch.setenv("SKY_ERR", "No cloud access: run sky check")
    with pytest.raises(HandoffError, match="No cloud access") as info:
        handoff_skypilot(gcs_bucket)
    assert info.value.exit_code == 1 and "run the same command again" in str(info.value.hint)
    assert load_record(open_store(gcs_bucket)).job_id == "Run_1"


def test_the_gce_engine_still_needs_its_flags() -> None:
    with pytest.raises(ConfigError, match="needs --project, --zone, --machine-type"):
        cmd_handoff(parse("gs://b/j", "--dry-run"))
