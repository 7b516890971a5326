"""Where this node stands: flags over torchrun, SLURM and SkyPilot environments; bounds.

Also the launcher's global ranks (``node_rank * nproc + local_rank``), the request's launch
flags, the rendezvous timeout's parsing and the CLI refusing bad node flags (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from colabjob.errors import ConfigError
from colabjob.jobs.rendezvous import DEFAULT_RENDEZVOUS_TIMEOUT, rendezvous_timeout
from colabjob.runner.child_protocol import RunRequest
from colabjob.runner.ranks import rank_env
from colabjob.runner.topology import DEFAULT_MASTER_PORT, NodeTopology, first_host, node_topology
from tests.cli.builders import run_main


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node[01-04,07]", "node01"),
        ("a,b", "a"),
        ("gpu7", "gpu7"),
        ("node[07,01-04]", "node07"),
        ("rack[1-2]-n[3,5],other", "rack1-n3"),
        ("tux[3-4],gpu[1-2]", "tux3"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "node[01", "[]", ",a"])
def test_a_node_list_that_cannot_be_read_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        first_host(bad)


def test_no_launcher_means_one_node_with_a_port_picked_later() -> None:
    assert node_topology({}) == NodeTopology()
    assert node_topology({}).master_port is None


def test_torchrun_environment() -> None:
    env = {
        "GROUP_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.2",
        "MASTER_PORT": "29400",
    }
    got = node_topology(env)
    assert (got.nnodes, got.node_rank, got.master_addr) == (2, 1, "10.0.0.2")
    assert got.master_port == 29401  # torchrun's agent keeps MASTER_PORT for its store
    assert got.source == "torchrun"


def test_slurm_environment() -> None:
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[12-15]"}
    got = node_topology(env)
    assert (got.nnodes, got.node_rank, got.master_addr) == (4, 2, "gpu12")
    assert got.master_port == DEFAULT_MASTER_PORT
    port = node_topology({**env, "MASTER_PORT": "1234"}).master_port
    assert port == 1234
    one = node_topology({"SLURM_JOB_NUM_NODES": "1", "SLURM_NODELIST": "n1"})
    assert (one.nnodes, one.node_rank, one.master_port) == (1, 0, None)


def test_skypilot_environment() -> None:
    env = {
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NODE_IPS": "10.1.0.5\n10.1.0.6\n",
    }
    got = node_topology(env)
    assert (got.nnodes, got.node_rank, got.master_addr, got.source) == (
        2,
        1,
        "10.1.0.5",
        "skypilot",
    )


def test_flags_win_over_the_environment_field_by_field() -> None:
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "a,b"}
    got = node_topology(env, master_port=4000, master_addr="head")
    assert (got.nnodes, got.node_rank, got.master_addr, got.master_port) == (2, 1, "head", 4000)
    assert got.source == "flags and slurm"
    # torchrun first, then SLURM, then SkyPilot when several are present
    both = {**env, "SKYPILOT_NUM_NODES": "3", "SKYPILOT_NODE_RANK": "2"}
    assert node_topology(both).source == "slurm"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nnodes": 0}, "--nnodes must be at least 1"),
        ({"nnodes": 2, "node_rank": 2}, "--node-rank 2 is outside 0..1"),
        ({"nnodes": 2, "node_rank": -1}, "--node-rank -1 is outside"),
        ({"nnodes": 2, "master_port": 0}, "--master-port must be in 1..65535"),
        ({"nnodes": 2, "master_port": 70000}, "--master-port must be in 1..65535"),
        ({"nnodes": 2, "master_addr": ""}, "--master-addr is empty"),
    ],
)
def test_out_of_bounds_values_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        node_topology({}, **kwargs)  # type: ignore[arg-type]


def test_a_bad_environment_value_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="SLURM_NODEID='x' is not an integer"):
        node_topology({"SLURM_NNODES": "2", "SLURM_NODEID": "x"})
    with pytest.raises(ConfigError, match=r"--node-rank 3 is outside 0\.\.1 for 2 node"):
        node_topology({"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "3"})


def test_global_ranks_and_world_size_across_nodes() -> None:
    envs = [
        rank_env(
            {"TORCHELASTIC_USE_AGENT_STORE": "True"},
            rank=local,
            nproc=2,
            master_addr="h",
            master_port=5,
            nnodes=3,
            node_rank=node,
        )
        for node in range(3)
        for local in range(2)
    ]
    assert [int(e["RANK"]) for e in envs] == list(range(6))
    assert {e["WORLD_SIZE"] for e in envs} == {"6"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"] * 3
    assert [e["GROUP_RANK"] for e in envs] == ["0", "0", "1", "1", "2", "2"]
    assert all("TORCHELASTIC_USE_AGENT_STORE" not in e for e in envs)  # our rank 0 serves


def test_the_request_runs_the_launcher_for_several_nodes_even_with_one_process() -> None:
    assert RunRequest(url="u", spec={}).launch_args() == []
    args = RunRequest(
        url="u", spec={}, nnodes=2, node_rank=1, master_addr="h", master_port=7
    ).launch_args()
    assert args == [
        "--nproc", "1", "--nnodes", "2", "--node-rank", "1", "--master-addr", "h",
        "--master-port", "7",
    ]  # fmt: skip
    again = RunRequest.from_json(RunRequest(url="u", spec={}, nnodes=2, node_rank=1).to_json())
    assert (again.nnodes, again.node_rank) == (2, 1)


def test_rendezvous_timeout_from_the_environment() -> None:
    assert rendezvous_timeout({}) == DEFAULT_RENDEZVOUS_TIMEOUT
    assert rendezvous_timeout({"COLABJOB_RENDEZVOUS_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="COLABJOB_RENDEZVOUS_TIMEOUT"):
            rendezvous_timeout({"COLABJOB_RENDEZVOUS_TIMEOUT": bad})


def test_cli_refuses_bad_node_flags_before_writing(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("job: {name: t, kind: python, entrypoint: 'train:main'}\n")
    store = tmp_path / "job"
    out = run_main("start", str(spec), "--storage", str(store), "--nnodes", "2", "--node-rank", "5")
    assert out.returncode == 2
    assert "--node-rank 5 is outside 0..1 for 2 node(s) (flags)" in out.stderr
    assert not store.exists()
    out = run_main("start", str(spec), "--storage", "memory://x", "--nnodes", "2")
    assert out.returncode == 2
    assert "--nnodes needs storage every machine can reach, not memory://" in out.stderr
