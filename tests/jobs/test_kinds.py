"""Each built-in kind end to end through ``run_kind``: a tiny model from a config, saved with
``save_pretrained`` and loaded by path; a run stopped by the policy mid-way and resumed in new
segments ends bit-identical to an uninterrupted one; LoRA checkpoints hold adapter tensors
only and the merged final artifact is a plain model; bad specs fail before any write.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from colabjob.errors import ConfigError
from colabjob.jobs.context import SegmentOutcome
from colabjob.jobs.data.tokenizer import TOKENIZER_KEY
from colabjob.jobs.demo import compare_final_weights
from colabjob.jobs.kinds import preflight, run_kind
from colabjob.jobs.kinds.final import fetch_final
from colabjob.jobs.state.restore import read_optimizer_state
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import open_store
from tests.jobs.kind_fixtures import (
    StopAfter,
    make_ctx,
    sigkill_spec,
    spec_for,
    tiny_model_dir,
    write_text_data,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    data = write_text_data(root / "data")
    return {"data": data, "model": tiny_model_dir(root / "model", data)}


def _segments(spec: Any, url: Path, every: int | None, limit: int = 6) -> list[SegmentOutcome]:
    """Run segments of ``every`` steps until the job completes."""
    outcomes = []
    for _ in range(limit):
        ctx = make_ctx(url, StopAfter(every), max_steps=spec.training.max_steps)
        outcomes.append(run_kind(spec, ctx))
        if outcomes[-1].completed:
            return outcomes
    raise AssertionError(f"not complete after {limit} segments: {outcomes}")


def _check_split_equals_straight(spec: Any, root: Path, every: int) -> list[SegmentOutcome]:
    straight = _segments(spec, root / "straight", None)
    assert [o.stop_reason for o in straight] == ["completed"]
    split = _segments(spec, root / "split", every)
    assert [o.stop_reason for o in split[:-1]] == ["budget"] * (len(split) - 1)
    assert split[-1].completed and split[-1].last_step == spec.training.max_steps
    assert [(o.first_step, o.last_step) for o in split][:2] == [(0, every), (every, 2 * every)]
    assert compare_final_weights(root / "straight", root / "split")
    assert not list(root.rglob("checkpoint-*")), "HF checkpoint-N folders must never appear"
    return split


def _latest_tensors(url: Path) -> dict[str, torch.Tensor]:
    cs = CheckpointStore(open_store(str(url)))
    with tempfile.TemporaryDirectory() as tmp:
        assert cs.fetch_latest(tmp) is not None
        return load_file(str(Path(tmp) / "model.safetensors"))


def test_finetune_resumes_bit_identical(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = spec_for("finetune", model_dir=assets["model"], data_path=assets["data"])
    _check_split_equals_straight(spec, tmp_path, every=3)
    info = CheckpointStore(open_store(str(tmp_path / "split"))).latest()
    assert info is not None and info.meta["batch"] == {"micro_batch": 2, "grad_accum": 2}
    from transformers import AutoModelForCausalLM

    assert fetch_final(open_store(str(tmp_path / "split")), tmp_path / "final") is not None
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "tokenizer_config.json").exists()  # saved next to the model
    saved = _latest_tensors(tmp_path / "split")
    assert torch.equal(final.state_dict()["transformer.h.0.attn.c_attn.weight"],
                       saved["transformer.h.0.attn.c_attn.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["finetune", "lora", "scratch", "python"])
def test_each_kind_resumes_bit_identical_after_sigkill(
    kind: str, assets: dict[str, Path], tmp_path: Path
) -> None:
    """Killed after step 5 (and after a background commit, every 2 steps, completed): the
    next segment resumes from whichever checkpoint committed and still ends bit-identical."""
    import subprocess
    import sys

    spec = sigkill_spec(kind, model_dir=assets["model"], data_path=assets["data"])
    assert _segments(spec, tmp_path / "straight", None)[0].completed
    if kind == "scratch":  # BPE training is not reproducible: both runs share the tokenizer
        stored = open_store(str(tmp_path / "straight")).read_bytes(TOKENIZER_KEY)
        open_store(str(tmp_path / "killed")).write_bytes(TOKENIZER_KEY, stored)
    child = subprocess.run(
        [sys.executable, "-m", "tests.jobs.kinds_child", str(tmp_path / "killed"),
         str(assets["model"]), str(assets["data"]), "5", kind],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert child.returncode == -9, child.stderr[-2000:]
    info = CheckpointStore(open_store(str(tmp_path / "killed"))).latest()
    assert info is not None and info.step >= 2  # a save due while one uploads is deferred
    rest = _segments(spec, tmp_path / "killed", None)
    assert rest[0].first_step == info.step and rest[-1].completed
    assert compare_final_weights(tmp_path / "straight", tmp_path / "killed")


def test_lora_checkpoints_hold_adapters_and_merged_final_is_plain(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    spec = spec_for(
        "lora", model_dir=assets["model"], data_path=assets["data"],
        lora={"r": 4, "dropout": 0.1}, checkpoint={"final_artifact": "merged"},
    )
    _check_split_equals_straight(spec, tmp_path, every=3)
    tensors = _latest_tensors(tmp_path / "split")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), list(tensors)
    assert any(bool(t.abs().sum()) for k, t in tensors.items() if "lora_B" in k)  # trained
    cs = CheckpointStore(open_store(str(tmp_path / "split")))
    latest = cs.latest()
    assert latest is not None
    opt = read_optimizer_state(cs.fetch(latest, tmp_path / "latest"))["optimizer"]
    assert len(opt["state"]) == len(tensors)  # AdamW moments of the adapters only

    fetch_final(open_store(str(tmp_path / "split")), tmp_path / "final")
    assert not (tmp_path / "final" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    assert not any("lora" in n for n, _ in merged.named_modules())
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(merged.state_dict()[key], base.state_dict()[key])
    assert torch.equal(merged.state_dict()["transformer.wte.weight"],
                       base.state_dict()["transformer.wte.weight"])


def _fetch_file(url: Path, name: str) -> Path:
    cs = CheckpointStore(open_store(str(url)))
    info = cs.latest()
    assert info is not None
    out = Path(tempfile.mkdtemp()) / name
    out.write_bytes(cs.read(info, name))
    return out


def test_lora_adapter_artifact_loads_with_peft(assets: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = spec_for(
        "lora", model_dir=assets["model"], data_path=assets["data"],
        training={"max_steps": 2}, lora={"r": 2},
    )
    assert run_kind(spec, make_ctx(tmp_path / "job")).completed
    fetch_final(open_store(str(tmp_path / "job")), tmp_path / "final")
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["r"] == 2 and set(config["target_modules"]) == {"c_attn", "c_proj"}
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    assert isinstance(PeftModel.from_pretrained(base, tmp_path / "final"), PeftModel)


def test_scratch_trains_its_tokenizer_once_and_resumes_bit_identical(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    spec = spec_for(
        "scratch", model_dir=None, data_path=assets["data"],
        model={"architecture": "gpt2",
               "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
        tokenizer={"train": {"vocab_size": 300, "min_frequency": 1}},
    )
    split = _segments(spec, tmp_path / "split", 3)
    assert [o.stop_reason for o in split] == ["budget", "budget", "completed"]
    stored = open_store(str(tmp_path / "split")).read_bytes(TOKENIZER_KEY)
    # BPE training is not reproducible run to run: the uninterrupted job gets the same
    # stored tokenizer, as a resumed session does
    open_store(str(tmp_path / "straight")).write_bytes(TOKENIZER_KEY, stored)
    assert _segments(spec, tmp_path / "straight", None)[0].completed
    assert compare_final_weights(tmp_path / "straight", tmp_path / "split")
    tensors = _latest_tensors(tmp_path / "split")
    assert tensors["transformer.wte.weight"].shape[0] == 300


def test_python_kind_runs_the_user_function_and_resumes_bit_identical(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    spec = spec_for(
        "python", model_dir=assets["model"], data_path=assets["data"],
        job={"entrypoint": f"{REPO / 'examples' / 'my_train.py'}:main",
             "args": {"hidden": 32, "layers": 1, "heads": 2, "dropout": 0.2}},
    )
    _check_split_equals_straight(spec, tmp_path, every=3)


def test_bad_specs_fail_before_writing_anything(assets: dict[str, Path], tmp_path: Path) -> None:
    bad_model = spec_for("finetune", model_dir=tmp_path / "no-such-model", data_path=assets["data"])
    with pytest.raises(ConfigError, match=r"model|tokenizer") as e:
        run_kind(bad_model, make_ctx(tmp_path / "a"))
    assert e.value.exit_code == 2
    bad_targets = spec_for(
        "lora", model_dir=assets["model"], data_path=assets["data"],
        lora={"target_modules": ["q_proj"]},
    )
    with pytest.raises(ConfigError, match="q_proj"):
        run_kind(bad_targets, make_ctx(tmp_path / "b"))
    bad_data = spec_for("finetune", model_dir=assets["model"], data_path=tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        run_kind(bad_data, make_ctx(tmp_path / "c"))
    bad_field = spec_for("finetune", model_dir=assets["model"], data_path=assets["data"],
                         data={"text_field": "content"})
    with pytest.raises(ConfigError, match="content"):
        run_kind(bad_field, make_ctx(tmp_path / "d"))
    for name in ("a", "b", "c", "d"):
        assert open_store(str(tmp_path / name)).list() == []
    for spec in (bad_model, bad_targets, bad_data, bad_field):
        with pytest.raises(ConfigError):
            preflight(spec)  # what the CLI runs before it opens the job's storage
    preflight(spec_for("lora", model_dir=assets["model"], data_path=assets["data"]))


class _CharTokenizer:
    """One token per character (ids 1..), EOS 0: enough to test packing without a model."""

    eos_token_id = pad_token_id = 0

    def __call__(self, text: Any, add_special_tokens: bool = False) -> dict[str, Any]:
        if isinstance(text, list):
            return {"input_ids": [[ord(c) - 96 for c in t] for t in text]}
        return {"input_ids": [ord(c) - 96 for c in text]}


def test_packing_padding_and_a_resumable_stream(tmp_path: Path) -> None:
    import datasets

    from colabjob.jobs.data.text import PackedStream, PaddedDataset, pack_tokens

    blocks = pack_tokens([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]  # the tail (a lone EOS) is dropped
    padded = PaddedDataset([[1, 2], [3, 4, 5, 6, 7]], seq_len=4, pad_id=9, eos_id=0)
    assert padded[0]["input_ids"].tolist() == [1, 2, 0, 9]
    assert padded[0]["labels"].tolist() == [1, 2, 0, -100]
    assert padded[1]["input_ids"].tolist() == [3, 4, 5, 0]  # truncated, EOS kept

    rows = {"text": ["abcde", "fg", "hijklmn", "op", "qrstu", "vwxyz"]}

    def stream() -> PackedStream:
        source = datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=2)
        return PackedStream(source, _CharTokenizer(), text_field="text", seq_len=4, eos_id=0)

    whole = [b["input_ids"].tolist() for b in stream()]
    first = stream()
    it = iter(first)
    head = [next(it)["input_ids"].tolist() for _ in range(3)]
    state = first.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    assert head + [b["input_ids"].tolist() for b in resumed] == whole
