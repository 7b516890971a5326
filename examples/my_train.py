"""The user function behind ``examples/python_job.yaml`` (``job.kind: python``).

colabjob calls ``main(session, spec)`` once per session. Everything is built from the spec
(``job.args`` holds this script's own settings), handed to ``session.track(...)`` (which
restores the newest checkpoint, RNGs last) and trained in an ordinary loop; ``session.step``
counts micro-batches, checkpoints on schedule and says when to stop. Run it with
``colabjob start examples/python_job.yaml`` from this directory, or set
``job.entrypoint: examples/my_train.py:main`` to run from the repository root.
"""

from __future__ import annotations

import math
from typing import Any


def main(session: Any, spec: Any) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, get_cosine_schedule_with_warmup

    from colabjob.jobs.data import make_loader
    from colabjob.jobs.data.text import build_dataset
    from colabjob.jobs.kinds.hf_trainer import load_tokenizer

    args, tr = spec.job.args, spec.training
    torch.manual_seed(tr.seed)
    tokenizer = load_tokenizer(spec.tokenizer.name_or_path or spec.model.name_or_path)
    dataset = build_dataset(spec.data, tokenizer)

    # our own small model: width and dropout from job.args
    dropout = float(args.get("dropout", 0.1))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.data.seq_len,
        n_embd=int(args.get("hidden", 64)),
        n_layer=int(args.get("layers", 2)),
        n_head=int(args.get("heads", 4)),
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    loader = make_loader(dataset, batch_size=tr.batch_size, seed=spec.data.seed or tr.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    steps = tr.max_steps or math.ceil(len(loader) * (tr.epochs or 1) / tr.grad_accum)
    scheduler = get_cosine_schedule_with_warmup(optimizer, tr.warmup_steps, steps)

    session.track(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                  grad_accum=tr.grad_accum)
    model.train()
    epochs = None if tr.max_steps else math.ceil(tr.epochs or 1)
    for batch in session.batches(epochs=epochs):
        loss = model(**batch).loss
        (loss / tr.grad_accum).backward()
        if session.optimizer_step_due:
            if tr.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if session.step(loss=loss.detach()):
            return
