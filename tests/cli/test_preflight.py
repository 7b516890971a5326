"""``colabjob start`` with bad specs, as a user runs it (a subprocess): exit 2, one clear line
and a hint, no traceback, and nothing written to the job's storage. The spec, the local
paths and what the kind would load (``jobs.kinds.preflight``: data and its text field, the
model's config, LoRA targets on a meta-device skeleton) are checked before the storage is
opened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli.builders import run_cli
from tests.jobs.kind_fixtures import tiny_model_dir, write_text_data


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preflight-assets")
    data = write_text_data(root / "data", docs=8, words=20)
    return {"data": data, "model": tiny_model_dir(root / "model", data, vocab=260)}


def _spec(tmp_path: Path, assets: dict[str, Path], kind: str, **sections: Any) -> Path:
    doc: dict[str, Any] = {
        "job": {"name": "bad", "kind": kind},
        "model": {"name_or_path": str(assets["model"])},
        "data": {"source": str(assets["data"]), "seq_len": 32},
        "training": {"max_steps": 2, "batch_size": 2},
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("missing-data", "finetune", {"data": {"source": "/nonexistent/train.jsonl"}},
     "data.source: '/nonexistent/train.jsonl' does not exist"),
    ("unknown-kind", "lorra", {}, "job.kind"),
    ("wrong-type", "finetune", {"training": {"batch_size": "eight"}}, "training.batch_size"),
    ("unknown-model", "finetune", {"model": {"name_or_path": "/nonexistent/model"}},
     "model.name_or_path: '/nonexistent/model' does not exist"),
    ("model-without-config", "finetune", {"model": {"name_or_path": "{empty}"}},
     "has no usable config"),
    ("lora-target", "lora", {"lora": {"target_modules": ["q_proj"]}},
     "lora.target_modules: ['q_proj'] not in the model (gpt2)"),
    ("text-field", "finetune", {"data": {"text_field": "content"}}, "content"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kind", "sections", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_spec_exits_2_and_writes_nothing(
    tmp_path: Path,
    assets: dict[str, Path],
    name: str,
    kind: str,
    sections: dict[str, Any],
    message: str,
) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    sections = json.loads(json.dumps(sections).replace("{empty}", str(empty)))
    spec = _spec(tmp_path, assets, kind, **sections)
    job = tmp_path / "jobs" / name
    out = run_cli("start", str(spec), "--storage", str(job), "--progress", "plain")
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("colabjob: error: ") and message in lines[0], out.stderr
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("  hint: ")), out.stderr
    assert "Traceback" not in out.stderr
    assert not job.exists() or not any(job.iterdir())  # nothing written to the job's storage
