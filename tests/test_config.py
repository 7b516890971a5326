"""Tests for the job spec (colabjob.config): loading, validation errors with paths and
suggestions, --set overrides, defaults, round trip, config hash and resume diffs."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from colabjob.config import (
    KINDS,
    JobSpec,
    TrainingSpec,
    apply_overrides,
    check_local_paths,
    config_hash,
    diff_for_resume,
    load_spec,
    render_template,
    resolve_target_modules,
    spec_from_text,
)
from colabjob.config._fields import Section, fields_of, parse_duration
from colabjob.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

MINIMAL = """
job: {name: demo, kind: finetune}
model: gpt2
data: data/train.jsonl
"""


def spec(text: str = MINIMAL, *overrides: str) -> JobSpec:
    return spec_from_text(text, list(overrides), source="t.yaml")


def error(text: str = MINIMAL, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        spec(text, *overrides)
    return info.value


def with_section(section: str) -> str:
    return MINIMAL + section + "\n"


# ---- files that must load -----------------------------------------------------------------------


def test_there_is_an_example_per_kind() -> None:
    kinds = {load_spec(p).kind for p in EXAMPLES}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_and_round_trips(path: Path) -> None:
    s = load_spec(path)
    assert JobSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert spec_from_text(s.to_yaml()) == s


@pytest.mark.parametrize("kind", KINDS)
def test_every_init_template_loads(kind: str) -> None:
    text = render_template(kind, name="my-run")
    s = spec_from_text(text, source=f"template {kind}")
    assert s.kind == kind and s.job.name == "my-run"
    assert text.count("#") > 10  # commented
    assert JobSpec.from_dict(s.to_dict()) == s


def test_unknown_template_kind() -> None:
    with pytest.raises(ConfigError, match="unknown job kind 'lorra'"):
        render_template("lorra")


def test_sections_are_frozen_and_keyword_only() -> None:
    s = spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.training.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainingSpec(8)  # type: ignore[misc]
    assert TrainingSpec(lr="3e-4").lr == 3e-4  # type: ignore[arg-type]  # checked at runtime too
    with pytest.raises(ConfigError, match=r"training\.batch_size: expected an integer"):
        TrainingSpec(batch_size="8")  # type: ignore[arg-type]


def test_minimal_spec_gets_defaults() -> None:
    s = spec()
    assert s.model is not None and s.model.name_or_path == "gpt2"
    assert s.data is not None and s.data.source == "data/train.jsonl" and s.data.packing
    assert s.training.epochs == 1.0 and s.training.max_steps is None
    assert s.training.lr == 5e-5 and s.checkpoint.keep == 2 and s.lora is None
    assert s.budget.margin_s == 300 and s.budget.limit_s is None


# ---- errors: unknown keys and wrong types -------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message", "hint"),
    [
        ("trainig: {lr: 0.1}", "trainig: unknown key", "did you mean 'training'?"),
        (
            "training: {bach_size: 4}",
            "training.bach_size: unknown key",
            "did you mean 'training.batch_size'?",
        ),
        (
            "training: {learning_rate: 0.1}",
            "training.learning_rate",
            "colabjob calls this 'training.lr'",
        ),
        ("training: {seq_len: 64}", "training.seq_len: unknown key", "'data.seq_len'"),
        ("lr: 0.1", "lr: unknown key", "did you mean 'training.lr'?"),
        ("budget: {limt: 1h}", "budget.limt: unknown key", "did you mean 'budget.limit'?"),
    ],
)
def test_unknown_key_names_path_and_suggests(section: str, message: str, hint: str) -> None:
    e = error(with_section(section))
    assert message in str(e) and e.hint is not None and hint in e.hint
    assert str(e).startswith("t.yaml: ") and e.exit_code == 2


@pytest.mark.parametrize(
    ("section", "message", "hint"),
    [
        (
            "training: {batch_size: '8'}",
            "training.batch_size: expected an integer, got '8'",
            "without quotes",
        ),
        ("training: {batch_size: 2.5}", "training.batch_size: expected an integer", None),
        (
            "training: {auto_batch_size: 1}",
            "training.auto_batch_size: expected true or false",
            None,
        ),
        (
            "training: {scheduler: cosin}",
            "training.scheduler: expected one of",
            "did you mean 'cosine'?",
        ),
        ("training: {lr: fast}", "training.lr: expected a number", None),
        (
            "lora: {target_modules: q_proj}",
            "lora.target_modules: expected a list of strings or one of 'auto'",
            None,
        ),
        ("checkpoint: 5", "checkpoint: expected a mapping of checkpoint settings", None),
        ("budget: {platform: colab-fre}", "budget.platform", "did you mean 'colab-free'?"),
        (
            "tokenizer: {train: {kind: bpe}}",
            "tokenizer.train.kind: expected one of 'byte-level-bpe'",
            None,
        ),
    ],
)
def test_wrong_type_names_path(section: str, message: str, hint: str | None) -> None:
    text = with_section(section).replace(
        "kind: finetune", "kind: lora" if "lora" in section else "kind: finetune"
    )
    e = error(text)
    assert message in str(e)
    if hint is not None:
        assert e.hint is not None and hint in e.hint


def test_wrong_kind_suggests() -> None:
    e = error(MINIMAL.replace("finetune", "fine-tune"))
    assert "job.kind" in str(e) and e.hint == "did you mean 'finetune'?"


def test_float_written_without_dot_is_a_number() -> None:
    assert spec(with_section("training: {lr: 5e-5}")).training.lr == 5e-5


def test_duplicate_key_is_refused() -> None:
    assert "'model' appears twice" in str(error(MINIMAL + "model: gpt2\n"))


def test_bad_yaml_and_non_mapping() -> None:
    assert "not valid YAML" in str(error("job: [unclosed\n"))
    assert "must be a mapping" in str(error("- a\n- b\n"))
    assert "job: required" in str(error(""))


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="job spec not found"):
        load_spec(tmp_path / "nope.yaml")


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "job.yaml"
    p.write_text(with_section("checkpoint: {keep: 1}"))
    with pytest.raises(ConfigError, match=re.escape(f"{p}: checkpoint.keep")):
        load_spec(p)


# ---- rules --------------------------------------------------------------------------------------


def test_exactly_one_of_steps_and_epochs() -> None:
    e = error(with_section("training: {max_steps: 10, epochs: 2}"))
    assert "exactly one of training.max_steps and training.epochs" in str(e)
    s = spec(with_section("training: {max_steps: 10}"))
    assert (s.training.max_steps, s.training.epochs) == (10, None)


def test_keep_below_two_is_refused() -> None:
    e = error(with_section("checkpoint: {keep: 1}"))
    assert "checkpoint.keep: must be at least 2" in str(e)


JOB, MODEL, DATA = MINIMAL.strip().splitlines()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (with_section("training: {batch_size: 0}"), "training.batch_size: must be greater than 0"),
        (with_section("training: {seed: -1}"), "training.seed: must be in [0, 2**32)"),
        (
            with_section("training: {max_grad_norm: 0}"),
            "training.max_grad_norm: must be greater than 0",
        ),
        (with_section("budget: {limit: 11x}"), "budget.limit: '11x' is not a duration"),
        (
            with_section("budget: {session_started_at: yesterday}"),
            "budget.session_started_at: 'yesterday'",
        ),
        (with_section("lora: {r: 4}"), "lora: only for kind 'lora'"),
        (
            with_section("checkpoint: {final_artifact: merged}"),
            "checkpoint.final_artifact: only for kind 'lora'",
        ),
        (
            with_section("tokenizer: {train: {vocab_size: 1000}}"),
            "tokenizer.train: only for kind 'scratch'",
        ),
        (
            f"{JOB}\n{MODEL}\ndata: {{source: x.txt, seq_len: 1}}",
            "data.seq_len: must be at least 2",
        ),
        (
            f"job: {{name: 'bad name', kind: finetune}}\n{MODEL}\n{DATA}",
            "job.name: 'bad name' is not",
        ),
        (
            f"job: {{name: a, kind: finetune, entrypoint: 'm:f'}}\n{MODEL}\n{DATA}",
            "job.entrypoint: only for",
        ),
        (
            "job: {name: a, kind: python, entrypoint: 'no-colon'}",
            "job.entrypoint: 'no-colon' is not",
        ),
        (
            f"{JOB}\nmodel: {{name_or_path: gpt2, config: {{n_positions: 128}}}}\n{DATA}",
            "data.seq_len: 1024 is longer than the model's 128 positions",
        ),
        (f"{JOB}\nmodel: {{name_or_path: gpt2, architecture: gpt2}}\n{DATA}", "give either"),
        (
            f"{JOB}\nmodel: {{architecture: gpt2}}\n{DATA}",
            "model.name_or_path: required for kind 'finetune'",
        ),
        (f"{JOB}\n{DATA}", "model: required for kind 'finetune'"),
        (f"{JOB}\n{MODEL}", "data: required for kind 'finetune'"),
        ("job: {name: a, kind: python}", "job.entrypoint: required for kind 'python'"),
    ],
)
def test_rules(text: str, message: str) -> None:
    assert message in str(error(text))


def test_kind_requirements() -> None:
    python = spec("job: {name: a, kind: python, entrypoint: 'pkg.train:main', args: {x: 1}}\n")
    assert python.model is None and python.data is None and python.job.args == {"x": 1}
    assert spec("job: {name: a, kind: python, entrypoint: 'scripts/train.py:main'}").job.entrypoint
    scratch = "job: {name: a, kind: scratch}\nmodel: {architecture: gpt2}\ndata: x.txt\n"
    assert "needs a tokenizer" in str(error(scratch))
    s = spec(scratch + "tokenizer: {train: {vocab_size: 512}}\n")
    assert s.tokenizer.train is not None and s.tokenizer.train.kind == "byte-level-bpe"
    small_vocab = error(
        scratch + "tokenizer: {train: {vocab_size: 512}}\n", "model.config.vocab_size=300"
    )
    assert "model.config.vocab_size: 300 is smaller" in str(small_vocab)
    assert spec(scratch, "tokenizer.name_or_path=gpt2").tokenizer.name_or_path == "gpt2"


def test_default_lr_per_kind() -> None:
    lora = spec(MINIMAL.replace("finetune", "lora"))
    assert lora.training.lr == 2e-4
    assert spec(MINIMAL.replace("finetune", "lora"), "training.lr=1e-3").training.lr == 1e-3


def test_budget_durations_and_times() -> None:
    s = spec(
        with_section("budget: {limit: 3600, margin: 90s, session_started_at: 2025-01-31T09:30:00Z}")
    )
    assert s.budget.limit == "3600s" and s.budget.limit_s == 3600 and s.budget.margin_s == 90
    assert s.budget.session_started_at == "2025-01-31T09:30:00+00:00"
    assert spec_from_text(s.to_yaml()) == s
    assert spec(MINIMAL, "budget.limit=11:30:00").budget.limit_s == 41400  # YAML 1.1 sexagesimal
    assert spec(MINIMAL, "budget.limit=1.5h").budget.limit_s == 5400
    e = error(MINIMAL, "budget.limit='90'")
    assert "budget.limit: '90' is not a duration" in str(e) and "90m" in (e.hint or "")


DURATIONS = [
    "11h30m",
    "90m",
    "45s",
    "1h",
    "1.5h",
    "2d",
    "1d2h",
    "1h 2m 3s",
    "30m1h",
    "11:30:00",
    "1-02:00",
    "0:90",
    ".5m",
    "",
    "90",
    "h",
    "1x",
    "5 x",
    "-5m",
    "1h-2m",
    "ten minutes",
]


@pytest.mark.parametrize("text", DURATIONS)
def test_duration_grammar_matches_the_runner(text: str) -> None:
    from colabjob.runner.platforms import parse_duration as runner_parse

    try:
        theirs: float | None = runner_parse(text)
    except ConfigError:
        theirs = None
    try:
        ours: float | None = parse_duration(text)
    except ValueError:
        ours = None
    assert ours == theirs


def test_data_source_format() -> None:
    def fmt(source: str, **kw: Any) -> str:
        extra = "".join(f", {k}: {v}" for k, v in kw.items())
        s = spec(MINIMAL.replace("data: data/train.jsonl", f"data: {{source: '{source}'{extra}}}"))
        assert s.data is not None
        return s.data.source_format

    assert (
        fmt("a/b.jsonl") == "jsonl"
        and fmt("corpus.txt") == "text"
        and fmt("x.parquet") == "parquet"
    )
    assert (
        fmt("tatsu-lab/alpaca") == "hf" and fmt("./books") == "text" and fmt("books/*.md") == "text"
    )
    assert fmt("some/dataset", format="jsonl") == "jsonl"


def test_check_local_paths(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    s = spec(MINIMAL.replace("data/train.jsonl", str(data)))
    with pytest.raises(ConfigError, match=r"data\.source: .* does not exist"):
        check_local_paths(s)
    data.write_text('{"text": "hi"}\n')
    check_local_paths(s)  # gpt2 is a hub name: not checked
    bad_model = spec(
        MINIMAL.replace("data/train.jsonl", str(data)), f"model.name_or_path={tmp_path}/nope"
    )
    with pytest.raises(ConfigError, match=r"model\.name_or_path"):
        check_local_paths(bad_model)


# ---- overrides ----------------------------------------------------------------------------------


def test_overrides_set_values_of_every_shape() -> None:
    s = spec(
        MINIMAL.replace("finetune", "lora"),
        "training.lr=3e-4",
        "model.dtype=bf16",  # expands the `model: gpt2` shorthand
        "model.config.n_layer=2",  # free-form mapping below model.config
        "lora.target_modules=[c_attn]",  # creates the absent section
        "budget.limit=11h30m",
        "job.storage=gs://b/p",
        "checkpoint.every_minutes=null",
    )
    assert s.training.lr == 3e-4 and s.model is not None and s.model.name_or_path == "gpt2"
    assert s.model.dtype == "bf16" and s.model.config == {"n_layer": 2}
    assert s.lora is not None and s.lora.target_modules == ("c_attn",)
    assert (
        s.budget.limit_s == 41400
        and s.job.storage == "gs://b/p"
        and s.checkpoint.every_minutes is None
    )


@pytest.mark.parametrize(
    ("item", "message", "hint"),
    [
        ("trainig.lr=1", "--set trainig.lr=1: trainig: unknown key", "did you mean 'training'?"),
        ("training.lrr=1", "training.lrr: unknown key", "did you mean 'training.lr'?"),
        ("training.lr.x=1", "'training.lr' is a value, not a section", "--set training.lr=VALUE"),
        ("training.lr", "expected KEY=VALUE", None),
        ("training..lr=1", "expected KEY=VALUE", None),
        ("training.batch_size=big", "training.batch_size: expected an integer, got 'big'", None),
    ],
)
def test_bad_overrides(item: str, message: str, hint: str | None) -> None:
    e = error(MINIMAL, item)
    assert message in str(e)
    if hint is not None:
        assert e.hint is not None and hint in e.hint


def test_override_steps_replaces_epochs() -> None:
    s = spec(with_section("training: {epochs: 3}"), "training.max_steps=500")
    assert (s.training.max_steps, s.training.epochs) == (500, None)
    assert "exactly one" in str(error(MINIMAL, "training.max_steps=5", "training.epochs=2"))
    data = {"training": {"max_steps": 5}}
    assert apply_overrides(data, ["training.epochs=2"]) == {"training": {"epochs": 2}}
    assert data == {"training": {"max_steps": 5}}  # the input is not modified


# ---- LoRA targets -------------------------------------------------------------------------------


def test_lora_target_module_defaults() -> None:
    assert resolve_target_modules("gpt2") == ("c_attn", "c_proj")
    for arch in ("llama", "mistral", "qwen2"):
        assert resolve_target_modules(arch) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert resolve_target_modules("gpt_neox") == ("query_key_value",)
    assert resolve_target_modules("opt") == ("q_proj", "v_proj")
    assert resolve_target_modules("falcon") == ("query_key_value",)
    assert resolve_target_modules("phi") == ("q_proj", "k_proj", "v_proj", "dense")
    with pytest.raises(ConfigError, match="no default for model type 'mamba'") as info:
        resolve_target_modules("mamba")
    assert info.value.hint is not None and "lora.target_modules" in info.value.hint


def test_lora_section_defaults_and_explicit_modules() -> None:
    s = spec(MINIMAL.replace("finetune", "lora"))
    assert s.lora is not None and s.lora.target_modules == "auto" and s.lora.r == 8
    assert s.lora.modules_for("llama") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert s.checkpoint.final_artifact == "adapter"
    explicit = spec(MINIMAL.replace("finetune", "lora"), "lora.target_modules=[c_attn]")
    assert explicit.lora is not None and explicit.lora.modules_for("anything") == ("c_attn",)


# ---- snapshot, hash, resume ---------------------------------------------------------------------


def _reversed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reversed(v) for k, v in reversed(list(value.items()))}
    return value


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_round_trip_and_hash_stable_across_key_order(path: Path) -> None:
    s = load_spec(path)
    d = s.to_dict()
    shuffled = JobSpec.from_dict(_reversed(d))
    assert shuffled == s and config_hash(shuffled) == config_hash(s)
    assert list(_reversed(d)) != list(d)
    assert re.fullmatch(r"[0-9a-f]{64}", config_hash(s))


def test_hash_follows_exactness_fields_only() -> None:
    base = spec()
    h = config_hash(base)
    assert (
        config_hash(spec(MINIMAL, "training.max_steps=99", "budget.limit=2h", "checkpoint.keep=5"))
        == h
    )
    assert config_hash(spec(MINIMAL, "training.seed=1")) != h
    assert config_hash(spec(MINIMAL, "data.seq_len=512")) != h


def test_logging_section_defaults_types_and_resume() -> None:
    s = spec()
    lg = s.logging
    assert (lg.tensorboard, lg.wandb, lg.wandb_project) == ("auto", False, None)
    on = spec(
        MINIMAL, "logging.wandb=true", "logging.wandb_project=runs", "logging.tensorboard=false"
    )
    lg = on.logging
    assert (lg.tensorboard, lg.wandb, lg.wandb_project) == (False, True, "runs")
    assert config_hash(on) == config_hash(s)  # trackers do not change the numbers
    assert diff_for_resume(s, on) == [
        "logging.tensorboard: 'auto' -> False",
        "logging.wandb: False -> True",
        "logging.wandb_project: None -> 'runs'",
    ]
    assert "logging.wandb" in str(error(MINIMAL, "logging.wandb=maybe"))
    assert "logging.tensorboard" in str(error(MINIMAL, "logging.tensorboard=sometimes"))


def test_diff_for_resume_refuses_exactness_changes_naming_fields() -> None:
    old = spec(with_section("training: {max_steps: 100}"))
    for item, field in [
        ("training.seed=7", "training.seed"),
        ("training.batch_size=16", "training.batch_size"),
        ("data.source=other.jsonl", "data.source"),
        ("model.name_or_path=gpt2-medium", "model.name_or_path"),
    ]:
        new = spec(with_section("training: {max_steps: 100}"), item)
        with pytest.raises(ConfigError) as info:
            diff_for_resume(old, new, False)
        assert field in str(info.value) and "--force" in (info.value.hint or "")
    new = spec(
        with_section("training: {max_steps: 100}"), "training.seed=7", "training.grad_accum=4"
    )
    with pytest.raises(ConfigError, match=r"training\.grad_accum, training\.seed"):
        diff_for_resume(old, new, False)


def test_diff_for_resume_allows_safe_changes_and_force() -> None:
    old = spec(with_section("training: {max_steps: 100}"))
    assert diff_for_resume(old, old, False) == []
    longer = spec(
        with_section("training: {max_steps: 100}"), "training.max_steps=200", "budget.margin=10m"
    )
    assert diff_for_resume(old, longer, False) == [
        "budget.margin: '5m' -> '10m'",
        "training.max_steps: 100 -> 200",
    ]
    reseeded = spec(with_section("training: {max_steps: 100}"), "training.seed=7")
    assert diff_for_resume(old, reseeded, force=True) == [
        "training.seed: 42 -> 7 (forced: no longer exact)"
    ]
    with pytest.raises(ConfigError, match=r"cannot change job\.kind"):
        diff_for_resume(
            old, spec(with_section("training: {max_steps: 100}"), "job.kind=lora"), True
        )
    # epochs -> steps through --set on the snapshot, as `resume --set` does
    snapshot = spec().to_dict()
    extended = JobSpec.from_dict(apply_overrides(snapshot, ["training.max_steps=5000"]))
    assert diff_for_resume(spec(), extended) == [
        "training.epochs: 1.0 -> None",
        "training.max_steps: None -> 5000",
    ]


# ---- docs and imports ---------------------------------------------------------------------------


def test_reference_documents_every_key() -> None:
    doc = (ROOT / "docs" / "job-spec.md").read_text()
    sections = dict(re.findall(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", doc, flags=re.M | re.S))
    for cls in Section.registry:
        top, _, sub = cls._path.partition(".")
        for f in fields_of(cls):
            key = f"{sub}.{f.name}" if sub else f.name
            assert f"`{key}`" in sections[top], (
                f"docs/job-spec.md does not document {cls._path}.{f.name}"
            )


def test_loading_a_spec_imports_no_torch() -> None:
    code = (
        "import sys, colabjob.config\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_public_api() -> None:
    import colabjob.config

    assert set(colabjob.config.__all__) == {
        "DEFAULT_LR", "DEFAULT_MARGIN", "KINDS", "LORA_TARGET_MODULES", "SAFE_TO_CHANGE",
        "BudgetSpec", "CheckpointSpec", "DataSpec", "JobSection", "JobSpec", "LoggingSpec",
        "LoraSpec", "ModelSpec",
        "TokenizerSpec", "TokenizerTrainSpec", "TrainingSpec", "apply_overrides",
        "check_local_paths", "config_hash", "diff_for_resume", "exactness_fields", "load_spec",
        "parse_yaml", "render_template", "resolve_target_modules", "spec_from_text",
    }  # fmt: skip
    assert all(hasattr(colabjob.config, name) for name in colabjob.config.__all__)
