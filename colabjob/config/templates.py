"""Commented starter specs for ``colabjob init --kind KIND``: one YAML text per kind, built
from shared section blocks so the comments stay in one place. Each loads back as a valid
JobSpec (the tests check), and each states the defaults it leaves out.
"""

from __future__ import annotations

from colabjob.config.run_sections import DEFAULT_MARGIN
from colabjob.config.schema import KINDS
from colabjob.errors import ConfigError

_HEADER = """\
# colabjob job spec, kind {kind}. Reference: docs/job-spec.md
# Any key can be overridden on the command line: --set training.lr=1e-4
# A resume needs only the job's storage URL: this spec is kept with the job.
"""

_JOB = """
job:
  name: {name}
  kind: {kind:<28}# finetune | lora | scratch | python
  # Where checkpoints and the job record live: a local path, /content/drive/MyDrive/...,
  # gs://bucket/prefix or s3://bucket/prefix. null: the CLI's --storage or its default.
  storage: null
"""

_PYTHON_JOB = """\
  entrypoint: train:main            # module:function (or path/to/file.py:function)
  args: {{}}                          # passed to your function as-is
"""

_MODELS = {
    "finetune": """
model:
  name_or_path: gpt2                # a hub name or a local directory
  dtype: auto                       # auto | fp32 | fp16 | bf16 (weights as loaded)
  gradient_checkpointing: auto      # true | false | auto (on when the model would not fit)
""",
    "lora": """
model:
  name_or_path: Qwen/Qwen2.5-0.5B   # a hub name or a local directory
  dtype: auto                       # auto | fp32 | fp16 | bf16 (frozen base weights)
  gradient_checkpointing: auto      # true | false | auto
""",
    "scratch": """
model:
  architecture: gpt2                # a model type; or name_or_path: a config to start from
  config:                           # overrides of the architecture's config
    n_layer: 6
    n_head: 6
    n_embd: 384
    n_positions: 512
  dtype: fp32                       # keep fp32 master weights; precision sets autocast

tokenizer:
  train:                            # trained on the job's data before step 0
    kind: byte-level-bpe
    vocab_size: 8192
  # or: name_or_path: gpt2          # an existing tokenizer instead
""",
    "python": """
# model, tokenizer and data are optional for kind python; your function sees them if set.
# model:
#   name_or_path: gpt2
""",
}

_DATA = """
data:
  source: {source}
  # format: auto                    # auto (by suffix) | text | jsonl | parquet | hf
  # split: train                    # hub datasets: split and config_name
  text_field: text                  # the column/key holding the text
  streaming: false                  # stream a hub dataset instead of downloading it
  packing: true                     # concatenate documents into full seq_len samples
  seq_len: {seq_len}
  shuffle: true                     # seeded by training.seed (or data.seed)
"""

_TRAINING = """
training:
  max_steps: {max_steps:<23}# or epochs: N (exactly one of the two)
  batch_size: {batch_size:<22}# per device, per micro-step
  grad_accum: {grad_accum:<22}# optimizer step every grad_accum micro-steps
  lr: {lr}
  scheduler: cosine                 # constant | linear | cosine
  warmup_steps: {warmup}
  weight_decay: {weight_decay}
  max_grad_norm: 1.0                # null: no clipping
  precision: auto                   # auto: bf16 where supported, fp16 on T4/V100, fp32 on CPU
  seed: 42
  auto_batch_size: false            # largest micro-batch that fits; grad_accum makes up the rest
  num_workers: 0
  log_every_steps: 10
"""

_LORA = """
lora:
  r: 16
  alpha: 32
  dropout: 0.05
  target_modules: auto              # auto: attention projections for the model type; or a list
"""

_CHECKPOINT = """
checkpoint:
  every_minutes: 30                 # and/or every_steps: N; a last one before time runs out
  keep: 2                           # at least 2
  staging_dir: null                 # local scratch for uploads (null: a temp dir)
  async: auto                       # background saves; auto: synchronous when RAM is short
{final}"""

_BUDGET = """
budget:
  platform: auto                    # auto | colab(-free) | colab-pro(+) | kaggle(-tpu) | slurm
                                    # | gce | local
  limit: null                       # session length, e.g. 11h30m (null: the platform's)
  margin: {margin:<28}# stop this long before the predicted end
  session_started_at: null          # ISO time; null: estimated (VM uptime on Colab)
"""

_FILL = {
    "finetune": dict(
        source="data/train.jsonl",
        seq_len=1024,
        max_steps=1000,
        batch_size=4,
        grad_accum=8,
        lr="5.0e-5",
        warmup=100,
        weight_decay=0.0,
    ),
    "lora": dict(
        source="tatsu-lab/alpaca",
        seq_len=1024,
        max_steps=1000,
        batch_size=4,
        grad_accum=4,
        lr="2.0e-4",
        warmup=50,
        weight_decay=0.0,
    ),
    "scratch": dict(
        source="data/corpus.txt",
        seq_len=512,
        max_steps=5000,
        batch_size=16,
        grad_accum=4,
        lr="6.0e-4",
        warmup=200,
        weight_decay=0.1,
    ),
    "python": dict(
        source="data/train.jsonl",
        seq_len=1024,
        max_steps=1000,
        batch_size=8,
        grad_accum=1,
        lr="1.0e-3",
        warmup=0,
        weight_decay=0.0,
    ),
}


def render_template(kind: str, *, name: str | None = None) -> str:
    """A commented YAML job spec of ``kind`` that loads as it is."""
    if kind not in KINDS:
        raise ConfigError(f"unknown job kind {kind!r}", hint=f"one of: {', '.join(KINDS)}")
    name = name or f"my-{kind}-job"
    fill = _FILL[kind]
    parts = [_HEADER.format(kind=kind), _JOB.format(name=name, kind=kind)]
    if kind == "python":
        parts.append(_PYTHON_JOB.format())
    parts.append(_MODELS[kind])
    data = _DATA.format(**fill)
    parts.append(data if kind != "python" else "\n# data is optional too:\n" + _comment(data))
    parts.append(_TRAINING.format(**fill))
    if kind == "lora":
        parts.append(_LORA)
    final = "  final_artifact: adapter           # adapter | merged (base weights + adapters)\n"
    parts.append(_CHECKPOINT.format(final=final if kind == "lora" else ""))
    parts.append(_BUDGET.format(margin=DEFAULT_MARGIN))
    return "".join(parts)


def _comment(block: str) -> str:
    return "".join(f"# {line}\n" if line.strip() else "" for line in block.splitlines())
