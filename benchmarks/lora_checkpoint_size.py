"""Bytes per LoRA checkpoint: colabjob's vs HF Trainer's, against the trainable-state floor.

A 4-layer GPT-2 built from a config (256 wide, vocab 2000, nothing downloaded) gets PEFT
LoRA adapters (r=8 on ``c_attn`` and ``c_proj``, the latter matching both the attention and
the MLP projection) and trains a few steps with AdamW through HF Trainer, twice, with the
same seed, data and arguments:

- ``ours``: the Trainer made resumable with ``colabjob.hf.resumable`` (the path the ``lora``
  kind takes) into a local job store; the figure is the total size of the committed
  checkpoint's folder (``ckpt/<step>-<uid>/``: every file, ``manifest.json`` included) after
  the job completes. Files outside it (``job.json``, the lease, the catalog) are listed
  but not counted: they are per job, not per checkpoint.
- ``hf``: plain HF Trainer saving with ``save_steps`` to an ``output_dir``; the figure is the
  total size of its ``checkpoint-N`` folder.

The floor is what an exact resume cannot do without: the adapter tensors plus AdamW's two
moments, i.e. 3 x the trainable parameters' bytes (fp32). Both checkpoints are broken down
per file. Reports only (target: ours <= 1.05x the floor).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

LAYERS, WIDTH, HEADS, VOCAB, SEQ = 4, 256, 4, 2000, 64
RANK, TARGETS = 8, ("c_attn", "c_proj")
BATCH, STEPS, SAMPLES = 4, 6, 96


class TokenRows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Fixed random token rows, labels = inputs (causal LM)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def lora_model() -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=LAYERS,
        n_embd=WIDTH,
        n_head=HEADS,
        n_positions=SEQ,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
    )
    lora = LoraConfig(
        r=RANK,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(GPT2LMHeadModel(config), lora)


def trainer(output_dir: Path, **args: Any) -> Any:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=1e-3,
        optim="adamw_torch",
        logging_steps=2,
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **args,
    )
    t = Trainer(model=lora_model(), args=targs, train_dataset=TokenRows())
    t.remove_callback(PrinterCallback)  # no loss dicts on stdout
    return t


def files_under(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


def show(name: str, files: dict[str, int], floor: int) -> int:
    total = sum(files.values())
    print(
        f"{name}: {total:,} bytes = {total / floor:.4f}x the floor "
        f"({total - floor:+,} bytes over it)"
    )
    for key, size in sorted(files.items(), key=lambda kv: -kv[1]):
        print(f"  {size:>10,}  {key}")
    return total


def main() -> None:
    from colabjob.hf import resumable

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory(prefix="colabjob-bench-lora-") as tmp:
        root = Path(tmp)

        ours = trainer(root / "ours-out", save_strategy="no")
        trainable = [p for p in ours.model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        dtypes = {str(p.dtype) for p in trainable}
        adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
        moments_bytes = 2 * sum(p.numel() * 4 for p in trainable)  # exp_avg, exp_avg_sq in fp32
        floor = adapter_bytes + moments_bytes
        total_params = sum(p.numel() for p in ours.model.parameters())
        print(
            f"GPT-2 {LAYERS}x{WIDTH}, vocab {VOCAB}: {total_params:,} parameters, "
            f"{n_trainable:,} trainable ({len(trainable)} LoRA tensors, {', '.join(dtypes)}); "
            f"floor = {adapter_bytes:,} adapter + {moments_bytes:,} AdamW moments "
            f"= {floor:,} bytes"
        )

        job = root / "job"
        ours = resumable(
            ours, str(job), platform="local", every_minutes=None, log=None, exit_on_pause=False
        )
        ours.train()
        ckpt_root = job / "ckpt"
        newest = sorted(d for d in ckpt_root.iterdir() if (d / "manifest.json").exists())[-1]
        our_total = show(f"ours ({newest.relative_to(job)})", files_under(newest), floor)
        per_job = {k: v for k, v in files_under(job).items() if not k.startswith("ckpt/")}
        print(f"  (per job, not counted: {sum(per_job.values()):,} bytes in {sorted(per_job)})")

        hf = trainer(root / "hf-out", save_strategy="steps", save_steps=STEPS)
        hf.train()
        hf_dir = root / "hf-out" / f"checkpoint-{STEPS}"
        hf_total = show(f"hf ({hf_dir.name})", files_under(hf_dir), floor)

    print(
        json.dumps(
            {
                "bench": "lora_checkpoint_size",
                "ours_vs_floor": round(our_total / floor, 4),
                "hf_vs_floor": round(hf_total / floor, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
