"""``training.fsdp`` in the Trainer-based kinds (``finetune``, ``scratch``, ``lora``) on 2
processes (gloo, CPU), through ``test_hf_distributed``'s 2-rank harness (tiny GPT-2, dropout
on, accumulation 2).

The model is sharded by transformers' own loading (``colabjob.jobs.hf.fsdp``): every rank
writes its shards of the model and optimizer with DCP into the checkpoint, and rank 0
commits them with the manifest. ``finetune``: a run whose rank 0 is SIGKILLed after step 5
(a committed checkpoint behind it) and resumed on 2 ranks ends bit-identical, model and
optimizer, to an uninterrupted run, and its final artifact is a whole model. ``scratch``: a
2-rank checkpoint resumes on 1 process and a 1-process checkpoint on 2 sharded ranks with
``allow_geometry_change``, each continuing the global sample order. ``lora``: the frozen
base is sharded, the adapters are saved whole; stopped and resumed on 2 ranks it ends
bit-identical, and its merged artifact is a plain model. A user's Trainer script whose
model is loaded with ``distributed_config`` stops on a signal to one rank and resumes
bit-identical too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from colabjob.jobs.kinds import run_kind
from colabjob.jobs.kinds.final import fetch_final
from colabjob.jobs.state.sharded import SHARDED_DIR
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.jobs.kind_fixtures import StopAfter, make_ctx, tiny_model_dir, write_text_data
from tests.jobs.test_fsdp_kind import _final_state, _flat
from tests.jobs.test_hf_distributed import STEPS, _latest, _launch, _launch_resumable, _spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    data = write_text_data(root / "data")
    return {"data": data, "model": tiny_model_dir(root / "model", data)}


def _doc(url: Path) -> tuple[Any, dict[str, Any]]:
    ckpts = CheckpointStore(open_store(str(url)))
    info = ckpts.latest()
    assert info is not None
    return info, json.loads(ckpts.read(info, "state.json"))


def _final_weights(
    url: Path, tmp: Path, name: str = "model.safetensors"
) -> dict[str, torch.Tensor]:
    local = tmp / f"final-{url.name}"
    assert fetch_final(open_store(str(url)), local) is not None
    return load_file(local / name)


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), f"{k}: max |d| = {(v - b[k]).abs().max()}"
        else:
            assert v == b[k], k


def test_finetune_sharded_sigkilled_and_resumed_is_bit_identical(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    data, model, kind = assets["data"], assets["model"], "finetune+fsdp"
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    _launch(tmp_path, kind, data, model, f"{straight}:-", f"{cut}:k5", name="a", killed=True)
    info, doc = _doc(cut)
    assert 2 <= info.step < STEPS  # the kill left a committed checkpoint, not the last one
    assert f"{SHARDED_DIR}/.metadata" in info.files and "model.safetensors" not in info.files
    assert any(f.endswith(".distcp") for f in info.files)
    assert doc["meta"]["sharded"] == SHARDED_DIR and doc["world_size"] == 2
    (rest,) = _launch(tmp_path, kind, data, model, f"{cut}:-", name="b")
    for r in range(2):
        assert (rest[r]["first_step"], rest[r]["last_step"]) == (info.step, STEPS)
        assert rest[r]["completed"]
    a, b = _flat(_final_state(straight, tmp_path)), _flat(_final_state(cut, tmp_path))
    assert any("exp_avg" in k for k in a)  # the optimizer state too
    _assert_same(a, b)
    wa, wb = _final_weights(straight, tmp_path), _final_weights(cut, tmp_path)
    assert "transformer.h.0.attn.c_attn.weight" in wa  # whole tensors, as save_pretrained
    _assert_same(wa, wb)


def test_scratch_sharded_checkpoints_change_world_size_both_ways(
    assets: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data, model, kind = assets["data"], assets["model"], "scratch+fsdp"
    two, one = tmp_path / "two", tmp_path / "one"
    _launch(tmp_path, kind, data, model, f"{two}:3", name="a")
    info, doc = _doc(two)
    assert info.step == 3 and doc["meta"]["sharded"] == SHARDED_DIR
    assert doc["counters"]["samples_seen"] == 3 * 8
    # 2 -> 1: the sharded checkpoint loads into a whole model, the sample order continues
    spec = _spec(kind, data, model)
    with pytest.warns(UserWarning, match="world_size 2 -> 1"):
        got = run_kind(
            spec, make_ctx(two, StopAfter(1), max_steps=STEPS, allow_geometry_change=True)
        )
    assert (got.first_step, got.last_step) == (3, 4)
    info, doc = _doc(two)
    assert info.step == 4 and "model.safetensors" in info.files  # one process: whole
    assert doc["data"]["sampler"]["offset"] == doc["counters"]["samples_seen"] == 3 * 8 + 4
    # 1 -> 2: a whole checkpoint cut to each rank's shards; the order goes on from there
    run_kind(spec, make_ctx(one, StopAfter(2), max_steps=STEPS))
    capfd.readouterr()
    (rest,) = _launch(tmp_path, kind, data, model, f"{one}:-g", name="c")
    assert capfd.readouterr().err.count("world_size 1 -> 2") == 2  # each rank's warning
    for r in range(2):
        assert (rest[r]["first_step"], rest[r]["last_step"]) == (2, STEPS)
    info, doc = _doc(one)
    assert info.step == STEPS and doc["meta"]["sharded"] == SHARDED_DIR
    assert doc["counters"]["samples_seen"] == 2 * 4 + (STEPS - 2) * 8
    assert doc["data"]["sampler"]["offset"] == doc["ranks"]["1"]["data"]["sampler"]["offset"]




def test_lora_on_a_sharded_base_resumes_bit_identical_with_whole_adapters(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    data, model, kind = assets["data"], assets["model"], "lora+fsdp"
    straight, split = tmp_path / "straight", tmp_path / "split"
    _launch(tmp_path, kind, data, model, f"{straight}:-", f"{split}:3", name="a")
    info, doc = _doc(split)
    assert info.step == 3 and "sharded" not in doc["meta"]
    assert doc["model"]["keys"] and all("lora_" in k for k in doc["model"]["keys"])
    _launch(tmp_path, kind, data, model, f"{split}:-", name="b")
    (sa, da, wa), (sb, db, wb) = _latest(straight), _latest(split)
    assert sa == sb == STEPS and da["counters"] == db["counters"]
    _assert_same(wa, wb)
    adapter = _final_weights(straight, tmp_path, "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # the adapter artifact


def test_lora_merged_artifact_of_a_sharded_base_is_a_plain_model(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    url = tmp_path / "merged"
    _launch(tmp_path, "lora+fsdp+merged", assets["data"], assets["model"], f"{url}:-", name="a")
    local = tmp_path / "final"
    assert fetch_final(open_store(str(url)), local) is not None
    merged = AutoModelForCausalLM.from_pretrained(local)
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    names = dict(merged.named_parameters())
    assert not any("lora" in n for n in names)
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, names[n])]
    assert changed and all(n.endswith(("c_attn.weight", "c_proj.weight")) for n in changed)


def test_a_users_script_with_a_model_sharded_as_it_loads_resumes_bit_identical(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """A user's Trainer script plus ``resumable()``, its model loaded with transformers'
    ``distributed_config`` (FSDP2) in fp32 on CPU: SIGUSR1 to rank 1 stops both ranks at
    one step with a sharded checkpoint; resumed, it ends bit-identical, model and optimizer,
    to an uninterrupted run."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    whole = _launch_resumable(tmp_path, straight, assets, 0, "a", "fsdp")
    assert all(o["completed"] and o["last_step"] == 6 for o in whole)
    first = _launch_resumable(tmp_path, split, assets, 3, "b", "fsdp")
    stopped = {o["last_step"] for o in first}
    assert len(stopped) == 1 and all(o["stop_reason"] == "signal" for o in first)
    info, doc = _doc(split)
    assert info.step == stopped.pop() and doc["meta"]["sharded"] == SHARDED_DIR
    rest = _launch_resumable(tmp_path, split, assets, 0, "c", "fsdp")
    assert all(o["completed"] and o["first_step"] == info.step for o in rest)
    a, b = _final_state(straight, tmp_path, 6), _final_state(split, tmp_path, 6)
    _assert_same(_flat(a), _flat(b))
