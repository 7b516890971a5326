"""The HF Trainer integration: an existing-style Trainer script plus the added lines of
``colabjob.hf.resumable`` stops on the runner's budget (a fake clock: each step "takes" 30
seconds; told ``save_guess="5m"``, the budget assumes 300 s for a save until one is measured,
so a 400 s session fits three steps), commits through our protocol (never an HF
``checkpoint-N`` folder), and resumes in the next "session" bit-identically, loss history
included; the mixin alone resumes an iterable dataset exactly; a paused script exits with 75;
a completed job loads its weights.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from colabjob.jobs.demo import compare_final_weights
from colabjob.runner.record import read_record
from colabjob.runner.states import JobState
from colabjob.storage.store import open_store
from tests.fakes import FakeClock
from tests.jobs.kind_fixtures import (
    StopAfter,
    make_ctx,
    params_equal,
    tiny_model_dir,
    write_text_data,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-assets")
    data = write_text_data(root / "data", docs=30, words=40)
    return {"data": data, "model": tiny_model_dir(root / "model", data)}


def _tick(clock: FakeClock, seconds: float) -> Any:
    from transformers import TrainerCallback

    class Tick(TrainerCallback):  # simulated time: every optimizer step takes `seconds`
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.advance(seconds)

    return Tick()


def user_script(
    url: Path, assets: dict[str, Path], out: Path, *, clock: FakeClock, budget: str, **kw: Any
) -> Any:
    """What a user already has, plus the two lines marked ``# colabjob``."""
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from colabjob.hf import resumable  # colabjob

    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    ds = datasets.load_dataset("json", data_files=str(assets["data"]), split="train")
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=24), batched=True,
                remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=3,
        num_train_epochs=2, learning_rate=2e-3, logging_steps=2, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, seed=11,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[_tick(clock, 30.0)])
    trainer = resumable(trainer, url, budget=budget, margin="5s", platform="local",  # colabjob
                        session_started_at=clock.time(), clock=clock, log=None, **kw)
    trainer.train()
    return trainer


def test_script_with_added_lines_pauses_on_budget_and_resumes_exactly(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    clock = FakeClock()
    straight = user_script(tmp_path / "straight", assets, tmp_path / "out1", clock=clock,
                           budget="10h")
    assert straight.colabjob_outcome.completed
    total = straight.state.global_step
    assert total == 10  # 30 docs / 2 per batch = 15 batches, 3 per step: 5 steps x 2 epochs

    outcomes = []
    for _ in range(8):
        trainer = user_script(tmp_path / "split", assets, tmp_path / "out2", clock=clock,
                              budget="400s", save_guess="5m", exit_on_pause=False)
        outcomes.append(trainer.colabjob_outcome)
        if outcomes[-1].completed:
            break
    assert outcomes[0].stop_reason == "budget" and 0 < outcomes[0].last_step < total
    assert outcomes[-1].completed and outcomes[-1].last_step == total
    assert [(o.first_step, o.last_step) for o in outcomes] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert all(b.first_step == a.last_step for a, b in itertools.pairwise(outcomes))
    assert compare_final_weights(tmp_path / "straight", tmp_path / "split")
    assert params_equal(straight.model, trainer.model)
    losses = [(r["step"], r["loss"]) for r in straight.state.log_history if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
    assert not list(tmp_path.rglob("checkpoint-*"))
    record = read_record(open_store(str(tmp_path / "split")))
    assert record is not None and record[0].state is JobState.COMPLETED
    assert [s.stop_reason.value for s in record[0].history if s.stop_reason][:1] == ["budget"]

    again = user_script(tmp_path / "split", assets, tmp_path / "out3", clock=clock, budget="400s")
    outcome = again.colabjob_outcome
    assert outcome.completed and outcome.first_step == outcome.last_step == total  # no training
    assert again.state.global_step == total  # the finished run's trainer state, not an empty one
    assert params_equal(straight.model, again.model)  # ...but the final weights are loaded


def test_paused_script_exits_75(assets: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        user_script(tmp_path / "job", assets, tmp_path / "out", clock=FakeClock(), budget="400s",
                    save_guess="5m", exit_on_pause=True)
    assert e.value.code == 75
    record = read_record(open_store(str(tmp_path / "job")))
    assert record is not None and record[0].state is JobState.SUSPENDED


def _iterable_trainer(assets: dict[str, Path], url: Path, out: Path, stop: int | None) -> Any:
    import datasets
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from colabjob.jobs.hf.trainer import make_resumable

    g = torch.Generator().manual_seed(3)
    rows = {"input_ids": torch.randint(0, 200, (40, 16), generator=g).tolist()}
    rows["labels"] = rows["input_ids"]
    stream = datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=2)
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=9, learning_rate=2e-3, logging_steps=1, save_strategy="steps", save_steps=2,
        report_to="none", use_cpu=True, seed=4, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=stream.with_format("torch"))
    return make_resumable(trainer, make_ctx(url, StopAfter(stop)))


def test_mixin_resumes_a_stream_exactly(assets: dict[str, Path], tmp_path: Path) -> None:
    ref = _iterable_trainer(assets, tmp_path / "ref", tmp_path / "o", None)
    ref.train()
    assert ref.colabjob_outcome.completed and ref.state.global_step == 9
    steps = []
    for _ in range(6):
        t = _iterable_trainer(assets, tmp_path / "split", tmp_path / "o", 4)
        t.train()
        steps.append((t.colabjob_outcome.first_step, t.colabjob_outcome.last_step))
        if t.colabjob_outcome.completed:
            break
    assert steps == [(0, 4), (4, 8), (8, 9)]
    assert params_equal(ref.model, t.model)
    assert not list((tmp_path / "o").glob("checkpoint-*"))
