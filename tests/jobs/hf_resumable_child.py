"""One rank of a user's HF Trainer script made resumable by ``colabjob.hf.resumable``, for
the multi-process test in ``test_hf_distributed.py`` (started 2 times by
``colabjob.runner.launch``, as torchrun would).

    python -m tests.jobs.hf_resumable_child URL MODEL_DIR DATA OUT SIGNAL_AFTER [fsdp]

With ``fsdp`` the model is sharded as transformers loads it
(``distributed_config=DistributedConfig(fsdp_size=2, ...)``, ``save_only_model=True`` as
transformers requires for such a model), as a user's FSDP2 script would. Rank 1 sends itself
SIGUSR1 at the end of optimizer step ``SIGNAL_AFTER`` (0: never), as
a scheduler's signal to one process would. Each rank writes ``OUT.rank<r>.json``: its
``colabjob_outcome``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    url, model_dir, data, out, signal_after = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    fsdp = argv[5:] == ["fsdp"]
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
    from colabjob.jobs.distributed import shutdown_distributed

    rank = int(os.environ.get("RANK", "0"))

    class SignalAfter(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if rank == 1 and state.global_step == signal_after:
                os.kill(os.getpid(), signal.SIGUSR1)

    tok = AutoTokenizer.from_pretrained(model_dir)
    if fsdp:
        from transformers.distributed import DistributedConfig

        plan = {"transformer.h.*": "free_full_weight"}  # GPT-2's blocks
        dc = DistributedConfig(fsdp_size=2, fsdp_plan=plan)
        model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=dc)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = datasets.load_dataset("json", data_files=data, split="train")
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=24), batched=True,
                remove_columns=["text"])
    args = TrainingArguments(
        output_dir=f"{out}.hf", per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=6, learning_rate=2e-3, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, seed=11, disable_tqdm=True,
        save_only_model=fsdp,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[SignalAfter()])  # fmt: skip
    trainer = resumable(trainer, url, platform="local", every_steps=2, every_minutes=None,
                        exit_on_pause=False, log=None, tensorboard=False)  # fmt: skip
    trainer.train()
    outcome = dataclasses.asdict(trainer.colabjob_outcome)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(outcome))
    shutdown_distributed()  # as a DDP script leaves its process group
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
