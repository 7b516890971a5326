"""A run_clm-like user script (HF's ``run_clm.py`` shape: INFO logging as ``should_log``
sets it, ``trainer.train()`` then ``save_model``, ``log_metrics``/``save_metrics`` and
``save_state`` into ``output_dir``) plus the two documented lines of
``colabjob.hf.resumable``, for ``test_hf_script.py``:

    python -m tests.jobs.hf_clm_child URL MODEL_DIR DATA OUT MAX_STEPS LR PAUSE_AT [EVERY]

``PAUSE_AT`` > 0: at the end of optimizer step PAUSE_AT the script sends itself SIGUSR1 (a
scheduler's signal) and waits until the stop policy has seen it; the job pauses there and
the script exits 75. ``output_dir`` is ``OUT/hf`` (the same on every rerun with the same
OUT, as a user's is); ``OUT/result.json`` holds ``training_loss`` and the metrics. ``EVERY``:
``resumable(every_steps=EVERY)`` (default: only the final checkpoint of a segment).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    url, model_dir, data, out = argv[:4]
    max_steps, lr, pause_at = int(argv[4]), float(argv[5]), int(argv[6])
    every = int(argv[7]) if len(argv) > 7 else None
    import datasets
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from colabjob.hf import resumable

    transformers.utils.logging.set_verbosity_info()  # run_clm does so on the main process
    transformers.utils.logging.enable_default_handler()

    class PauseAt(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == pause_at:
                os.kill(os.getpid(), signal.SIGUSR1)
                for _ in range(6000):  # until the watchdog's handler has run (a bound)
                    if trainer._colabjob.ctx.policy.should_stop() is not None:
                        break
                    time.sleep(0.01)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = datasets.load_dataset("json", data_files=data, split="train")
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=24), batched=True,
                remove_columns=["text"])
    args = TrainingArguments(
        output_dir=f"{out}/hf", per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=max_steps, learning_rate=lr, lr_scheduler_type="constant", logging_steps=4,
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=11,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[PauseAt()])  # fmt: skip
    trainer = resumable(trainer, url, platform="local", every_minutes=None, every_steps=every,
                        tensorboard=False)  # fmt: skip  (the added line)
    train_result = trainer.train()
    trainer.save_model()
    metrics = train_result.metrics
    metrics["train_samples"] = len(ds)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    result = {"training_loss": train_result.training_loss, "metrics": metrics}
    Path(out, "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
