"""An ordinary HF Trainer fine-tuning script, made session-resumable by colabjob.

The lines marked ``# colabjob`` are the only change to the script as it was. Run it in a
session; when the budget is nearly spent it commits a checkpoint to ``--storage`` and exits
with code 75. Run the same command in the next session and it continues exactly where it
stopped (same data position, RNGs, optimizer and scheduler); once the job is complete it
saves the model as before.

    python examples/hf_trainer_script.py --model gpt2 --data data/train.txt \\
        --storage /content/drive/MyDrive/colabjob/gpt2-hf --budget colab-free
"""

from __future__ import annotations

import argparse

from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from colabjob.hf import resumable  # colabjob


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--data", default="data/train.txt")
    parser.add_argument("--storage", default="runs/gpt2-hf")  # any path, Drive or gs:// URL
    parser.add_argument("--budget", default=None)  # e.g. colab-free, 11h30m; None: detect
    parser.add_argument("--output", default="out")
    opts = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(opts.model)

    dataset = load_dataset("text", data_files=opts.data, split="train")
    dataset = dataset.filter(lambda row: bool(row["text"].strip()))
    dataset = dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=256),
        batched=True,
        remove_columns=["text"],
    )

    args = TrainingArguments(
        output_dir=opts.output,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        num_train_epochs=3,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        warmup_steps=100,
        logging_steps=20,
        eval_strategy="no",
        save_strategy="steps",  # with colabjob these saves are commits to --storage
        save_steps=500,
        report_to="none",
        seed=42,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer = resumable(trainer, opts.storage, budget=opts.budget)  # colabjob
    trainer.train()
    trainer.save_model(f"{opts.output}/final")
    tokenizer.save_pretrained(f"{opts.output}/final")


if __name__ == "__main__":
    main()
