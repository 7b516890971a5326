"""The final artifact of a Trainer-based job: what ``from_pretrained`` loads once it completes.

``final_artifact`` saves the trained model (a kind's ``save_model``, by default its
``save_pretrained``) with the tokenizer and commits it under the job root's ``final/`` with
the same manifest-last protocol as checkpoints (``final/ckpt/<step>-<uid>/``); with several
processes rank 0 commits it (a sharded model is gathered by every rank first).
``fetch_final`` downloads the newest one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.jobs.context import SegmentContext
from colabjob.jobs.distributed import World
from colabjob.jobs.state.sharded import is_sharded

if TYPE_CHECKING:
    from colabjob.storage.checkpoints import CheckpointInfo
    from colabjob.storage.store import Store

__all__ = ["FINAL_DIR", "commit_final", "fetch_final", "final_artifact", "final_store"]

FINAL_DIR = "final"


def final_artifact(
    ctx: SegmentContext,
    step: int,
    model: Any,
    tokenizer: Any,
    save_model: Callable[[Any, Path, bool], None] | None,
) -> CheckpointInfo | None:
    """Rank 0 commits the final artifact: ``save_model(model, directory, main)``'s, by default
    ``save_pretrained``'s. A sharded model is saved by every rank (``save_pretrained``
    gathers its weights then, whole in rank 0's host memory; ``main`` says which rank writes),
    into a local folder first; a whole one by rank 0 alone, straight into the commit.
    Returns the committed artifact on rank 0, None on the others."""
    save = save_model or _save_pretrained
    main = World.current().is_main
    if is_sharded(model):
        with tempfile.TemporaryDirectory(prefix="colabjob-final-", dir=ctx.staging_dir) as tmp:
            save(model, Path(tmp), main)
            if main:
                tokenizer.save_pretrained(tmp)

                def copy(directory: Path) -> None:
                    shutil.copytree(tmp, directory, dirs_exist_ok=True)

                return commit_final(ctx, step, copy)
        return None
    if not main:
        return None

    def write_final(directory: Path) -> None:
        save(model, directory, True)
        tokenizer.save_pretrained(directory)

    return commit_final(ctx, step, write_final)


def _save_pretrained(model: Any, directory: Path, main: bool) -> None:
    model.save_pretrained(directory, is_main_process=main)


def final_store(ctx: SegmentContext) -> Any:
    from colabjob.storage.checkpoints import CheckpointStore

    return CheckpointStore(
        ctx.store.child(FINAL_DIR), fence=ctx.checkpoints.fence, staging_dir=ctx.staging_dir
    )


def commit_final(ctx: SegmentContext, step: int, write: Callable[[Path], None]) -> CheckpointInfo:
    """Commit the final artifact of ``step`` (skipped when one is already committed)."""
    store = final_store(ctx)
    have = store.latest()
    if have is not None and have.step == step:
        return have

    def writer(staging: Path) -> dict[str, Path]:
        write(staging)
        return {p.relative_to(staging).as_posix(): p for p in staging.rglob("*") if p.is_file()}

    return store.save(step, writer, epoch=ctx.epoch, config_hash=ctx.config_hash,
                      meta={"final": True})


def fetch_final(store: Store, local_dir: str | Path) -> CheckpointInfo | None:
    """Download the job's newest final artifact into ``local_dir`` (None if there is none)."""
    from colabjob.storage.checkpoints import CheckpointStore

    return CheckpointStore(store.child(FINAL_DIR)).fetch_latest(local_dir)
