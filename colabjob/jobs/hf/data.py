"""The HF Trainer integration's training data: the resumable train loader and the hand-over
of a resumed epoch to the Trainer's epoch loop.

``train_loader(trainer, world_size)`` replaces the Trainer's own train ``DataLoader`` (and
its ``accelerate`` sharding): ``make_loader`` (a seeded per-epoch permutation that seeks in
O(1)) on one process, ``make_distributed_loader`` (this rank's share of the same global
order) on several. ``align_epoch`` starts the Trainer's epoch where the loader stands, so a
resumed epoch's gradient-accumulation windows line up exactly. The mixin that uses both is
``colabjob.jobs.hf.trainer``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from colabjob.jobs.data import ResumableLoader, make_loader
from colabjob.jobs.distributed import make_distributed_loader
from colabjob.jobs.hf.callback import HFRun, remaining_batches

__all__ = ["align_epoch", "train_loader"]


def train_loader(trainer: Any, world_size: int) -> ResumableLoader:
    """The resumable train loader for ``trainer`` (its dataset, collator and arguments)."""
    if trainer.train_dataset is None:
        raise ValueError("Trainer: training requires a train_dataset.")
    dataset, collator = trainer.train_dataset, trainer.data_collator
    try:
        import datasets

        is_hf_table = isinstance(dataset, datasets.Dataset)
    except ImportError:  # pragma: no cover - datasets is a dependency of the dev setup
        is_hf_table = False
    if is_hf_table:
        dataset = trainer._remove_unused_columns(dataset, description="Training")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="Training")
    args = trainer.args
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    pin = bool(args.dataloader_pin_memory) and torch.cuda.is_available()
    extra: dict[str, Any] = {"pin_memory": pin}
    if args.dataloader_num_workers > 0:
        extra["prefetch_factor"] = args.dataloader_prefetch_factor
        extra["multiprocessing_context"] = args.dataloader_multiprocessing_context
    common: dict[str, Any] = {
        "batch_size": trainer._train_batch_size,
        "seed": args.data_seed if args.data_seed is not None else args.seed,
        "shuffle": False if iterable else args.train_sampling_strategy != "sequential",
        "num_workers": args.dataloader_num_workers,
        "collate_fn": collator,
        **extra,
    }
    if world_size > 1:  # this rank's share of the global order
        grad_accum = int(args.gradient_accumulation_steps)
        return make_distributed_loader(dataset, grad_accum=grad_accum, **common)
    return make_loader(dataset, drop_last=args.dataloader_drop_last, **common)


def align_epoch(run: HFRun, loader: ResumableLoader, kwargs: dict[str, Any], ga: int) -> None:
    """Start HF's epoch where the loader stands: a spent epoch moves on to the next one;
    a resumed one is handed over as the batches it has left (GA windows line up).
    ``kwargs`` are the Trainer's ``_run_epoch`` arguments (changed in place)."""
    left = remaining_batches(loader)
    if left == 0:  # every batch of this epoch was yielded: move to the next epoch
        for _ in loader:
            pass
        left = remaining_batches(loader)
    assert left is not None
    total = int(kwargs["steps_in_epoch"])
    run.epoch_batches, run.batches_in_epoch = total, total - left
    if 0 < left < total:
        kwargs["steps_in_epoch"] = left
        kwargs["num_update_steps_per_epoch"] = max(math.ceil(left / ga), 1)
    run.epoch_index = int(loader.state_dict()["epoch"])
