"""``training.fsdp`` / ``--fsdp`` for the built-in kinds, through the CLI.

Kind ``python`` on 2 processes (gloo, CPU) with ``--fsdp``: its function shards the model
with ``colabjob.jobs.sharding.shard_model``; the job is paused by a preemption notice at
step 3 (exit 75), resumed, its rank 0 SIGKILLed right after committing step 5 (the
supervisor retries from that checkpoint) and it completes bit-identical (model and
optimizer gathered from the final DCP checkpoint) to an uninterrupted ``--fsdp`` run.
Every kind takes ``training.fsdp``; a ``finetune`` job started with ``--nproc 2 --fsdp``
commits sharded checkpoints and a whole final model (the Trainer kinds' resumes are in
``test_hf_fsdp``). The ``python`` kind hands it to its Session, whose ``track()`` refuses a
whole model; one process only notes it; it may change on resume and stays out of the config
hash.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from colabjob.config import JobSpec
from colabjob.errors import ConfigError
from colabjob.jobs.sharding import blocks
from colabjob.jobs.state.sharded import SHARDED_DIR
from colabjob.runner.record import load_record
from colabjob.runner.states import JobState
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore
from tests.cli.builders import run_cli

REPO = Path(__file__).resolve().parents[2]

TRAIN = """
import os, signal
import torch
from torch import nn
from colabjob.jobs.distributed import World, make_distributed_loader
from colabjob.jobs.sharding import shard_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8)])
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def main(session, spec):
    args, world = spec.job.args, World.current()
    torch.manual_seed(0)
    model = Net()
    if args.get("shard", True):
        model = shard_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    loader = make_distributed_loader(data, batch_size=2, seed=0)
    session.track(model=model, optimizer=opt, loader=loader)
    resumed = session.global_step > 0
    for x, y in session.batches():
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.get("pause") and world.rank == 0 and session.global_step == 2 and not resumed:
            os.kill(os.getpid(), signal.SIGUSR1)  # a preemption notice: pause at step 3
        stop = session.step(loss=loss)
        kill = args.get("kill")
        if kill and resumed and session.global_step == 5 and not os.path.exists(kill):
            session.save(final=True)  # committed on every rank, then the VM vanishes
            if world.is_main:
                open(kill, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        if stop:
            return
"""

SPEC = """
job:
  name: fsdp
  kind: python
  entrypoint: fsdp_train:main
  args: {{pause: {pause}, kill: {kill}}}
training: {{max_steps: 8, log_every_steps: 1}}
checkpoint: {{every_steps: 2, every_minutes: null}}
budget: {{platform: local}}
"""


def _env(tmp: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{tmp}:{REPO}", "OMP_NUM_THREADS": "1"}


def _job(tmp: Path, name: str, *, pause: bool, kill: bool) -> tuple[Path, Path]:
    (tmp / "fsdp_train.py").write_text(TRAIN)
    spec = tmp / f"{name}.yaml"
    marker = tmp / f"{name}-killed" if kill else "null"
    spec.write_text(SPEC.format(pause=str(pause).lower(), kill=marker))
    return spec, tmp / name


def _final_state(url: Path, tmp: Path, steps: int = 8) -> dict[str, Any]:
    """The newest checkpoint (step ``steps``): its model and optimizer, gathered whole
    from its DCP files."""
    ckpts = CheckpointStore(open_store(url))
    info = ckpts.latest()
    assert info is not None and info.step == steps
    assert f"{SHARDED_DIR}/.metadata" in info.files and "model.safetensors" not in info.files
    local = ckpts.fetch(info, tmp / f"fetched-{url.name}")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp_to_torch_save(local / SHARDED_DIR, local / "full.pt")
    state: dict[str, Any] = torch.load(local / "full.pt", weights_only=True)
    return state


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    return {prefix: tree}


@pytest.mark.slow
def test_python_kind_with_fsdp_paused_killed_and_resumed_is_bit_identical(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path)
    flags = ("--nproc", "2", "--fsdp", "--progress", "none", "--retry-backoff", "0")
    spec, straight = _job(tmp_path, "straight", pause=False, kill=False)
    out = run_cli("start", str(spec), "--storage", str(straight), *flags, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    spec, url = _job(tmp_path, "cut", pause=True, kill=True)
    out = run_cli("start", str(spec), "--storage", str(url), *flags, env=env)
    assert out.returncode == 75, out.stdout + out.stderr
    paused = CheckpointStore(open_store(url)).latest()
    assert paused is not None and paused.step == 3
    assert f"{SHARDED_DIR}/__1_0.distcp" in paused.files
    out = run_cli("resume", str(url), *flags[:2], *flags[3:], env=env)  # fsdp: in the spec now
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "cut-killed").exists()  # the SIGKILL happened, then the retry
    record = load_record(open_store(url))
    assert record.state is JobState.COMPLETED and record.last_step == 8
    a, b = _flat(_final_state(straight, tmp_path)), _flat(_final_state(url, tmp_path))
    assert a.keys() == b.keys() and any("exp_avg" in k for k in a)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


def _spec(kind: str, **training: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"job": {"name": "j", "kind": kind}, "training": training}
    if kind == "python":
        doc["job"]["entrypoint"] = "m:f"
    else:
        doc["model"] = {"name_or_path": "gpt2"}
        doc["data"] = {"source": "d.jsonl"}
    return doc


@pytest.mark.parametrize("kind", ["python", "finetune", "lora", "scratch"])
def test_every_kind_takes_fsdp(kind: str) -> None:
    doc = _spec(kind, fsdp=True)
    if kind == "scratch":
        doc["model"] = {"architecture": "gpt2"}
        doc["tokenizer"] = {"name_or_path": "gpt2"}
    assert JobSpec.from_dict(doc).training.fsdp is True


@pytest.mark.slow
def test_cli_runs_a_finetune_job_sharded_on_two_processes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from colabjob.jobs.kinds.final import fetch_final
    from tests.jobs.kind_fixtures import tiny_model_dir, write_text_data

    data = write_text_data(tmp_path / "data")
    model = tiny_model_dir(tmp_path / "model", data)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"job: {{name: ft, kind: finetune}}\nmodel: {{name_or_path: {model}}}\n"
        f"data: {{source: {data}, seq_len: 32}}\n"
        "training: {max_steps: 4, batch_size: 2, log_every_steps: 1}\n"
        "checkpoint: {every_steps: 2, every_minutes: null}\nbudget: {platform: local}\n"
    )
    url = tmp_path / "job"
    out = run_cli(
        "start", str(spec), "--storage", str(url), "--nproc", "2", "--fsdp",
        "--progress", "none", env=_env(tmp_path), timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert load_record(open_store(url)).state is JobState.COMPLETED
    infos = CheckpointStore(open_store(url)).list()
    assert [i.step for i in infos] == [2, 4]
    assert all(f"{SHARDED_DIR}/.metadata" in i.files for i in infos)
    assert fetch_final(open_store(str(url)), tmp_path / "final") is not None
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # whole again
    base = AutoModelForCausalLM.from_pretrained(model)
    assert final.transformer.h[0].attn.c_attn.weight.shape == (
        base.transformer.h[0].attn.c_attn.weight.shape
    )
    assert not torch.equal(final.transformer.h[0].attn.c_attn.weight,
                           base.transformer.h[0].attn.c_attn.weight)  # trained


def test_fsdp_may_change_on_resume_and_stays_out_of_the_config_hash() -> None:
    from colabjob.config import config_hash, diff_for_resume

    old, new = JobSpec.from_dict(_spec("python")), JobSpec.from_dict(_spec("python", fsdp=True))
    assert diff_for_resume(old, new) == ["training.fsdp: False -> True"]
    assert config_hash(old) == config_hash(new)


def test_shard_model_finds_the_blocks_and_leaves_one_process_whole() -> None:
    from torch import nn

    from colabjob.jobs.sharding import shard_model

    inner = nn.ModuleList([nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2)])])
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(inner))
    assert blocks(model) == [inner[0], inner[1]]
    assert os.environ.get("WORLD_SIZE", "1") == "1"
    assert shard_model(model) is model and not any(
        type(p).__name__ == "DTensor" for p in model.parameters()
    )


def test_track_refuses_a_whole_model_when_the_job_asks_for_fsdp() -> None:
    from torch import nn

    from colabjob.jobs.tracking import build_tracked

    kwargs: dict[str, Any] = dict(
        model=nn.Linear(2, 2), optimizer=None, scheduler=None, scaler=None, loader=None,
        grad_accum=1, batch_size=None, world_size=2, distributed=False, extras=None,
        optional=None, trainable_only=None,
    )
    assert build_tracked(**kwargs).model is kwargs["model"]
    with pytest.raises(ConfigError, match=r"training\.fsdp is on, but the model") as e:
        build_tracked(**kwargs, require_sharded=True)
    assert "shard_model" in str(e.value.hint)


def test_the_python_kind_hands_training_fsdp_to_its_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from colabjob.jobs.context import SegmentContext
    from colabjob.jobs.kinds import python as kind

    seen: list[bool] = []
    monkeypatch.setattr(kind, "load_entrypoint", lambda _: lambda s: seen.append(s.ctx.fsdp))
    store = open_store(tmp_path / "job")
    ctx = SegmentContext(store=store, checkpoints=CheckpointStore(store))
    for fsdp in (True, False):
        kind.run(JobSpec.from_dict(_spec("python", fsdp=fsdp)), ctx)
    assert seen == [True, False]


def test_fsdp_on_one_process_is_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    from colabjob.cli.run import _note_fsdp

    _note_fsdp(True, 2)
    _note_fsdp(False, 1)
    assert capsys.readouterr().err == ""
    _note_fsdp(True, 1)
    assert "training.fsdp with one process: the model stays whole" in capsys.readouterr().err
