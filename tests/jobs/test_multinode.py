"""Several machines, simulated on one: ``colabjob start`` twice on 127.0.0.1, one per node.

Two nodes of one process each train the job to the end, and the final weights are
bit-identical to one node of two processes (the same global ranks, the same global sample
order); node 0 alone holds the lease and writes the record. A node pointed at a master
nobody listens on, a master port already in use and nodes that disagree on ``--nnodes``
each end with exit 2 and a message naming the cause, within the rendezvous timeout
(``COLABJOB_RENDEZVOUS_TIMEOUT``, a few seconds here; the subprocess timeouts only keep a
regression from hanging the suite).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colabjob.runner.ranks import free_port
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage import open_store

from .test_distributed import REPO, SPEC, TRAIN, _state_doc, _weights

# The test job, except that in its first session global rank 0 sends itself SIGUSR1 at step
# 3 (a notice only node 0 gets): every rank on every node stops at one step, exit 75.
PAUSE_TRAIN = TRAIN.replace(
    "        if session.step(loss=loss):",
    "        if world.rank == 0 and session.global_step == 3 and not resumed:\n"
    "            import os, signal\n"
    "            os.kill(os.getpid(), signal.SIGUSR1)\n"
    "        if session.step(loss=loss):",
).replace(
    "    for x, y in session.batches():",
    "    resumed = session.global_step > 0\n    for x, y in session.batches():",
)
pytestmark = pytest.mark.slow
WAIT = 240  # seconds: a hang fails the test instead of the suite
LAUNCHERS = ("GROUP_RANK", "LOCAL_WORLD_SIZE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")


def _env(tmp: Path, timeout: float = 60) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHERS}
    env.pop("SKYPILOT_NUM_NODES", None)
    env.update(
        PYTHONPATH=f"{tmp}:{REPO}",
        OMP_NUM_THREADS="1",
        COLABJOB_RENDEZVOUS_TIMEOUT=str(timeout),
    )
    return env


def _job(tmp: Path, name: str) -> tuple[Path, Path]:
    (tmp / "ddp_train.py").write_text(TRAIN)
    spec = tmp / f"{name}.yaml"
    spec.write_text(SPEC.format(marker=tmp / f"{name}-rank"))
    return spec, tmp / name


def _start(spec: Path, url: Path, env: dict[str, str], *flags: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "colabjob.cli", "start", str(spec), "--storage", str(url)]
    return subprocess.Popen(
        [*cmd, "--progress", "none", *flags],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _resume(url: Path, env: dict[str, str], *flags: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "colabjob.cli", "resume", str(url), "--progress", "none"]
    return subprocess.Popen(
        [*cmd, *flags], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _nodes(nnodes: int, rank: int, port: int) -> tuple[str, ...]:
    return (
        "--nnodes",
        str(nnodes),
        "--node-rank",
        str(rank),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
    )


def _finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=WAIT)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_two_nodes_of_one_equal_one_node_of_two_bit_for_bit(tmp_path: Path) -> None:
    env = _env(tmp_path)
    spec, one = _job(tmp_path, "one")
    ((rc, err),) = _finish([_start(spec, one, env, "--nproc", "2")])
    assert rc == 0, err
    spec, two = _job(tmp_path, "two")
    port = free_port()
    procs = [_start(spec, two, env, *_nodes(2, r, port)) for r in range(2)]
    (rc0, err0), (rc1, err1) = _finish(procs)
    assert (rc0, rc1) == (0, 0), err0 + err1
    assert "node 1 of 2" in err1 and "follows node 0" in err1
    # every rank saw the whole world; the record is node 0's alone, the run complete
    assert [(tmp_path / f"two-rank{r}").read_text() for r in range(2)] == ["2", "2"]
    record = load_record(open_store(two))
    assert record.state is JobState.COMPLETED and record.last_step == 6
    assert len(record.history) == 1
    assert _state_doc(two)["world_size"] == 2
    _same_weights(one, two)
    # paused on both nodes (exit 75: global rank 0 got SIGUSR1), then resumed on both
    (tmp_path / "pause_train.py").write_text(PAUSE_TRAIN)
    spec, three = _job(tmp_path, "three")
    spec.write_text(spec.read_text().replace("ddp_train:main", "pause_train:main"))
    port = free_port()
    procs = [_start(spec, three, env, *_nodes(2, r, port)) for r in range(2)]
    (rc0, err0), (rc1, err1) = _finish(procs)
    assert (rc0, rc1) == (75, 75), err0 + err1
    assert load_record(open_store(three)).state is JobState.SUSPENDED
    port = free_port()
    procs = [_resume(three, env, *_nodes(2, r, port)) for r in range(2)]
    (rc0, err0), (rc1, err1) = _finish(procs)
    assert (rc0, rc1) == (0, 0), err0 + err1
    record = load_record(open_store(three))
    assert record.state is JobState.COMPLETED and len(record.history) == 2
    _same_weights(one, three)


def _same_weights(a_url: Path, b_url: Path) -> None:
    (step_a, a), (step_b, b) = _weights(a_url), _weights(b_url)
    assert step_a == step_b == 6
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_node_that_cannot_reach_the_master_exits_2_naming_it(tmp_path: Path) -> None:
    spec, url = _job(tmp_path, "job")
    port = free_port()  # nobody listens there
    proc = _start(spec, url, _env(tmp_path, timeout=3), *_nodes(2, 1, port))
    ((rc, err),) = _finish([proc])
    assert rc == 2, err
    assert f"could not reach the master at 127.0.0.1:{port} within 3s" in err
    assert not (url / "job.json").exists()  # a follower writes nothing to the job


def test_a_master_port_in_use_exits_2_naming_the_port(tmp_path: Path) -> None:
    spec, url = _job(tmp_path, "job")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _start(spec, url, _env(tmp_path, timeout=3), *_nodes(2, 0, port))
        ((rc, err),) = _finish([proc])
    assert rc == 2, err
    assert f"master port {port} on this node is already in use" in err
    assert "--master-port" in err  # the hint: what to do


def test_nodes_that_disagree_on_the_node_count_exit_2(tmp_path: Path) -> None:
    spec, url = _job(tmp_path, "job")
    env, port = _env(tmp_path, timeout=20), free_port()
    procs = [_start(spec, url, env, *_nodes(n, r, port)) for n, r in ((2, 0), (3, 1))]
    (rc0, err0), (rc1, err1) = _finish(procs)
    assert (rc0, rc1) == (2, 2), err0 + err1
    assert "mismatched world sizes: rank 1 expects 3 process(es) in all" in err0
    assert "the master (rank 0) expects 2 process(es) in all, this rank (1) 3" in err1
