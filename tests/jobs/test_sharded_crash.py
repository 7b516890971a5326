"""A sharded (FSDP2, 2-rank) save killed or failing at its file events.

``tests/jobs/sharded_crash_child.py`` runs 2-rank gloo groups (forked from one driver that
imported torch once): a checkpoint at step 2, then a counted save at step 4. A whole run
records every file event of that save on both ranks; then, for each kind of event (its
function, the store or local staging, and the file: a ``.distcp`` shard, DCP's
``.metadata``, a checkpoint file, the manifest, a directory, cleanup), one run SIGKILLs the
rank just before the first event of that kind and the driver SIGKILLs the other rank. The
kinds seen here: open and fsync of each rank's shard, open/fsync/rename of ``.metadata``,
directory fsyncs, the staged files' open/replace, each checkpoint file's open/fsync/
replace, the manifest's open/fsync/link/unlink, and the cleanup after the commit. The
full set (about 45 events) would take a minute more; one run per kind covers them all.

After each kill: ``latest()`` (every byte hashed) is step 2 or step 4, never a part, and
no corruption is reported; every listed checkpoint loads (DCP, into a plain model and
optimizer) equal to the same step of the whole run; the next commit leaves no orphan
prefix. Kills before and after the commit both happen.

A failed save (an injected I/O error on rank 1's shard, or on rank 0's manifest, on every
try): every rank goes on, the next save commits, nothing is left in the run's local
staging, and the next session's start (``colabjob.session``) removes the failed save's
prefix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import colabjob
from colabjob.jobs.state.sharded import SHARDED_DIR, load_sharded
from colabjob.storage import open_store
from colabjob.storage.catalog import CorruptCheckpointWarning
from colabjob.storage.checkpoints import CheckpointInfo, CheckpointStore

from .helpers import IN, OUT

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("sharded-crash")
    out = root / "out.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.jobs.sharded_crash_child", str(root), str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, json.loads(out.read_text())


def _loaded(ckpts: CheckpointStore, info: CheckpointInfo, local: Path) -> dict[str, Any]:
    """The checkpoint's model and optimizer, loaded (DCP) into a plain model and AdamW."""
    ckpts.fetch(info, local)
    model = nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, OUT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    load_sharded(model, opt, local / SHARDED_DIR)
    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        state.update({f"opt/{i}/{k}": v for k, v in s.items()})
    return state


def _equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def _orphans(root: Path) -> set[str]:
    """The checkpoint prefixes under ``root`` without a manifest."""
    ckpt = root / "ckpt"
    return {d.name for d in ckpt.iterdir() if not (d / "manifest.json").exists()}


def test_a_kill_at_any_file_event_leaves_the_previous_or_the_new_checkpoint(
    runs: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    root, results = runs
    whole = CheckpointStore(open_store(root / "whole"))
    ref = {i.step: _loaded(whole, i, tmp_path / f"whole-{i.step}") for i in whole.list()}
    assert set(ref) == {2, 4}
    kills = [r for r in results[1:] if not r.get("fail")]
    kinds = {tuple(k["event"].split()[::2]) for k in kills}  # (function, file)
    for rank in (0, 1):  # each rank's shard: opened, synced
        assert {("open", "shard"), ("fsync", "shard")} <= {
            tuple(k["event"].split()[::2]) for k in kills if k["rank"] == rank
        }
    assert {("rename", "metadata"), ("link", "manifest"), ("replace", "file")} <= kinds, kinds
    seen: dict[int, int] = {}
    for k in kills:
        assert k["status"][k["rank"]] == -9, k
        store = open_store(root / k["name"])
        ckpts = CheckpointStore(store)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CorruptCheckpointWarning)  # a kill is no corruption
            latest = ckpts.latest(verify="full")
            listed = ckpts.list()
        assert latest is not None and latest == listed[-1], k
        assert latest.step in (2, 4) and {i.step for i in listed} <= {2, 4}, k
        for info in listed:
            _equal(_loaded(ckpts, info, tmp_path / f"{k['name']}-{info.step}"), ref[info.step])
        seen[latest.step] = seen.get(latest.step, 0) + 1
        ckpts.save(6, {"note.txt": b"after the kill"})  # the next commit sweeps the rest
        assert not _orphans(root / k["name"]), k
    assert seen.get(2) and seen.get(4), seen  # kills before and after the commit


@pytest.mark.parametrize("name", ["fail-shard", "fail-manifest"])
def test_a_failed_sharded_save_leaves_nothing_once_the_next_session_starts(
    runs: tuple[Path, list[dict[str, Any]]], name: str
) -> None:
    root, results = runs
    (run,) = [r for r in results if r["name"] == name]
    assert run["status"] == [0, 0], run  # every rank went on
    assert all("injected I/O error" in r["failed"] for r in run["events"]), run["events"]
    job = root / name
    ckpts = CheckpointStore(open_store(job))
    assert [i.step for i in ckpts.list()] == [2, 5]  # the next save committed
    assert not list((root / f"{name}-staging").iterdir())  # no local leftovers
    left = _orphans(job)  # what the failed save left in the store, if anything
    said: list[str] = []
    with colabjob.session(str(job), platform="local", log=said.append, max_steps=5):
        pass
    assert not _orphans(job)
    for prefix in left:  # removed by the start of the next session, which says so
        assert any(f"removed ckpt/{prefix}" in line for line in said), said
