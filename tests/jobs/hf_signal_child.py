"""A run_clm-like user script (HF ``Trainer`` with ``dataloader_num_workers=2``, plus the two
documented lines of ``colabjob.hf.resumable``) for the signal tests in
``test_hf_signals.py``. It runs in its own process group, as under SLURM or a process
manager, and signals that whole group (the loader workers included):

    python -m tests.jobs.hf_signal_child URL MODEL_DIR DATA OUT MODE

MODE ``none``: train, then ``save_model``. ``wait@K``: at the end of optimizer step K, write
``OUT/ready`` and wait for the test to send SIGTERM to the group (from another process, as
SLURM does: torch's workers exit quietly only on their parent's SIGTERM); the script then
exits 75, paused. ``term-in-save``: train, then SIGTERM to the group in the middle of a
slowed ``save_model`` (the job is COMPLETED by then).
Writes ``OUT/outcome.json`` (the ``colabjob_outcome``) and the model under ``OUT/model``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    url, model_dir, data, out, mode = argv
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from colabjob.hf import resumable

    wait_at = int(mode.split("@")[1]) if mode.startswith("wait@") else -1

    class WaitAt(TrainerCallback):  # for `scancel`, SLURM's time limit or `kill -TERM -PGID`
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == wait_at:
                Path(out).mkdir(parents=True, exist_ok=True)
                Path(out, "ready").write_text("1")
                for _ in range(6000):  # until the signal has reached this process
                    if trainer._colabjob.ctx.policy.should_stop() is not None:
                        break
                    time.sleep(0.01)
                time.sleep(0.5)  # the workers' fate (dead or alive) reaches us meanwhile

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = datasets.load_dataset("json", data_files=data, split="train")
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=24), batched=True,
                remove_columns=["text"])
    args = TrainingArguments(
        output_dir=f"{out}/hf", per_device_train_batch_size=2, gradient_accumulation_steps=3,
        num_train_epochs=2, learning_rate=2e-3, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, seed=11, disable_tqdm=True,
        dataloader_num_workers=2,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[WaitAt()])  # fmt: skip
    trainer = resumable(trainer, url, platform="local", every_steps=2, every_minutes=None,
                        tensorboard=False)  # fmt: skip  (the added line; exits 75 on a pause)
    trainer.train()
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "outcome.json").write_text(json.dumps(dataclasses.asdict(trainer.colabjob_outcome)))
    if mode == "term-in-save":
        save = trainer._save

        def slow_save(*a: Any, **kw: Any) -> Any:
            os.killpg(os.getpgrp(), signal.SIGTERM)
            time.sleep(0.3)  # the signal is handled while the model is being saved
            return save(*a, **kw)

        trainer._save = slow_save
    trainer.save_model(f"{out}/model")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
