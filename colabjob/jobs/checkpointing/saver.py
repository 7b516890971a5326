"""The Session's checkpoints: restore the newest, snapshot, commit in the background.

A ``Checkpointer`` holds the objects a session tracks (``SessionTracked``) and moves their state
through ``ctx.checkpoints``: ``restore()`` fetches the newest committed checkpoint (every
byte verified) and loads it, quarantining one that does not load and falling back to the
previous one (``ctx.resume`` may choose one by hand; a job whose record shows committed
progress never starts over silently when none is left); ``snapshot()`` copies the state
to CPU memory on the training thread, the only part the loop waits for (GPU tensors into
the pinned buffers of the committer's ``staging`` pool). Committing is the ``committer``'s
(``colabjob.jobs.checkpointing.committer.Committer``, the same one the HF Trainer path uses).

With a ``Coordinator`` (several processes) rank 0 picks the checkpoint to restore and every
rank loads it (its own RNGs and loader position; a rank the checkpoint has none for seeds
its RNGs from ``(seed, rank, step)``); a snapshot gathers every rank's RNGs and loader
position to rank 0, which alone writes and commits. The model, optimizer and the rest are
taken from rank 0 (identical on every rank under ``DistributedDataParallel``). A sharded
(FSDP2) model and its optimizer are the exception: every rank writes its shards with DCP
into the ``dcp/`` folder of the checkpoint prefix rank 0 reserves (in the background where
host memory allows), rank 0 commits them once every rank's write finished, and every rank
loads them back (``colabjob.jobs.state.sharded``, ``colabjob.jobs.state.dcp_writer``); a
whole checkpoint (one process, DDP) resumed into a sharded model is cut to each rank's
shards (``colabjob.jobs.state.whole_to_sharded``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.errors import (
    CheckpointError,
    CorruptCheckpointError,
    NoCheckpointError,
    ResumeError,
    UnsafeCheckpointError,
)
from colabjob.jobs.checkpointing.committer import Committer
from colabjob.jobs.context import SegmentContext
from colabjob.jobs.distributed import Coordinator
from colabjob.jobs.state.capture import snapshot
from colabjob.jobs.state.codec import deep_cpu_copy, read_json
from colabjob.jobs.state.dcp_writer import (
    ShardWrite,
    checkpoint_group,
    shard_target,
    start_shard_write,
)
from colabjob.jobs.state.format import STATE_FILE, Counters, RankState, Restored, Snapshot
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.rng import capture_rng, derive_seed, seed_everything
from colabjob.jobs.state.sharded import (
    SHARDED_DIR,
    SHARDED_META,
    load_sharded,
    saves_shards,
    sharded_state,
)
from colabjob.jobs.state.sizing import checkpoint_nbytes
from colabjob.jobs.state.whole_to_sharded import load_whole
from colabjob.jobs.tracking import SessionTracked
from colabjob.storage.catalog import CorruptCheckpointWarning
from colabjob.storage.selection import (
    ResumeChoice,
    fetch_choice,
    nothing_left,
    quarantined_ids,
    set_aside_unloadable,
    supersede,
)

if TYPE_CHECKING:
    from colabjob.storage.checkpoints import CheckpointInfo, CheckpointStore

__all__ = [
    "Checkpointer",
    "agree_on_load",
    "fetch_agreed",
    "gather_rank_states",
    "load_model_state",
    "loads_apart",
    "refuse_silent_restart",
    "seed_missing_rank",
    "send_rank_state",
    "start_shards",
]

log = logging.getLogger(__name__)


class Checkpointer:
    """Restores and saves one session's tracked objects; see the module docstring."""

    def __init__(
        self,
        ctx: SegmentContext,
        *,
        say: Callable[[str], None],
        on_commit: Callable[[int], None] | None = None,
        sync: Coordinator | None = None,
    ) -> None:
        self.ctx = ctx
        self.sync = sync
        self.rank = 0 if sync is None else sync.rank
        self.tracked = SessionTracked()
        self.committer = Committer(ctx, sync=sync, on_commit=on_commit)
        self._say = say

    # -- restore ------------------------------------------------------------------------------
    def restore(self) -> tuple[CheckpointInfo, Restored] | None:
        """Load the newest committed checkpoint into the tracked objects (RNGs last).

        One that verifies but does not load (``CorruptCheckpointError``,
        ``UnsafeCheckpointError``: its content, not a changed model or config) is
        quarantined and the previous one is tried, in this process; ``restore()`` checks
        every file before it changes an object. A checkpoint chosen by hand is not replaced
        by another; checkpoints newer than it are set aside once it loaded."""
        ctx = self.ctx
        if ctx.staging_dir is not None:
            Path(ctx.staging_dir).mkdir(parents=True, exist_ok=True)
        explicit = ctx.resume is not None and ctx.resume.explicit
        while True:
            with tempfile.TemporaryDirectory(prefix="colabjob-restore-", dir=ctx.staging_dir) as d:
                info = self._fetch(d)
                if info is None:
                    refuse_silent_restart(ctx)
                    return None
                got: Restored | None = None
                failure: CheckpointError | None = None
                try:
                    got = self._load(d, info)
                except (CorruptCheckpointError, UnsafeCheckpointError) as e:
                    failure = e
            failure = agree_on_load(self.sync, failure)
            if failure is None and got is not None:
                break
            failure = failure or CorruptCheckpointError(f"step {info.step} did not load")
            if self.rank == 0:
                set_aside_unloadable(ctx.checkpoints, info, failure)
            if explicit:  # chosen by hand: never load another one instead (nor on a retry)
                raise NoCheckpointError(
                    f"the chosen checkpoint step {info.step} ({info.dirname}) does not load: "
                    f"{failure.args[0]}; it was quarantined",
                    hint=f"choose another one (colabjob resume {ctx.store.url} --from-step N), "
                    "or resume without a choice to use the newest valid checkpoint",
                ) from failure
        if explicit and self.rank == 0:
            supersede(ctx.checkpoints, info, f"resumed from step {info.step} by hand")
        if self.rank and not got.rng_found:  # a rank the checkpoint's run did not have
            seed = int(getattr(self.tracked.loader, "seed", 0) or 0)
            seed_missing_rank(seed, self.rank, got, self._say)
        self.committer.committed_step = info.step
        return info, got

    def _load(self, tmp: str, info: CheckpointInfo) -> Restored:
        """Load the checkpoint downloaded into ``tmp`` into the tracked objects; every file
        is checked before an object changes (``colabjob.jobs.state.restore.restore``)."""
        ctx, t = self.ctx, self.tracked
        saved_hash = str(info.manifest.get("config_hash") or "")
        if ctx.config_hash and saved_hash and saved_hash != ctx.config_hash:
            log.warning("checkpoint step %d was written with another config", info.step)
        doc = read_json(Path(tmp) / STATE_FILE) or {}
        saved_extras = set(doc.get("extras") or {})
        for name in sorted(set(t.optional) - saved_extras):
            self._say(f"checkpoint step {info.step} holds no {name!r} (optional): kept fresh")
        loaded = t.loaded(saved_extras)
        special = loads_apart(doc, t.model, t.trainable_only)
        if special:  # the model and optimizer are loaded below
            loaded = dataclasses.replace(loaded, model=None, optimizer=None)
        got = restore(
            tmp, loaded, allow_geometry_change=ctx.allow_geometry_change, rank=self.rank
        )
        if special and t.model is not None:
            load_model_state(Path(tmp), doc, t.model, t.optimizer)
        return got

    def _fetch(self, tmp: str) -> CheckpointInfo | None:
        """The checkpoint to resume from, downloaded into ``tmp`` (see ``fetch_agreed``)."""
        return fetch_agreed(self.ctx.checkpoints, self.sync, tmp, self.ctx.resume)

    # -- save ---------------------------------------------------------------------------------
    def snapshot(
        self,
        *,
        counters: Counters,
        metrics: list[dict[str, Any]],
        meta: dict[str, Any],
        emergency: bool,
        background: bool = False,
    ) -> tuple[Snapshot, float]:
        """The state in CPU memory and how long copying it took (the loop's pause). With
        several processes every rank must call it at the same step (rank 0 gathers).
        ``background``: for ``Committer.save_async``; a copy is taken only when it fits in
        host memory (``ctx.async_checkpoint``, ``colabjob.jobs.state.host_memory``), else the
        snapshot refers to the live tensors and ``save_async`` commits it synchronously."""
        t = self.tracked
        mono = self.ctx.monotonic
        t0 = mono()
        sync = self.sync
        shards = (
            self._save_shards(counters.step, background)
            if saves_shards(t.model, t.trainable_only)
            else None
        )
        if sync is not None and sync.rank != 0:
            send_rank_state(sync, t.loader)
            return Snapshot(counters=counters), mono() - t0
        saved = t.saved(emergency=emergency)
        meta = {**meta, "emergency": emergency}
        if shards is not None:  # the model and optimizer are on disk already: copy the rest
            saved = dataclasses.replace(saved, model=None, optimizer=None)
            meta[SHARDED_META] = SHARDED_DIR
            clone = True
        else:
            clone = background and self.committer.background_fits(
                checkpoint_nbytes(t.model, t.optimizer, trainable_only=t.trainable_only)
            )
        snap = snapshot(
            saved,
            counters=counters,
            metrics=metrics,
            meta=meta,
            clone=clone,
            staging=self.committer.staging,
        )
        if shards is not None:
            snap = dataclasses.replace(snap, shards=shards)
        if sync is not None:
            snap = gather_rank_states(sync, snap)
        return snap, mono() - t0

    def _save_shards(self, step: int, background: bool) -> ShardWrite:
        t = self.tracked
        assert t.model is not None
        return start_shards(
            self.ctx, self.committer, self.sync, t.model, t.optimizer, step, background=background
        )


def start_shards(
    ctx: SegmentContext,
    committer: Committer,
    sync: Coordinator | None,
    model: Any,
    optimizer: Any,
    step: int,
    *,
    background: bool,
) -> ShardWrite:
    """Every rank: start writing the sharded model's and optimizer's DCP files of ``step``
    into the checkpoint prefix rank 0 reserves (a local folder rank 0 makes when the store
    has no fsspec target); in the background when ``background`` and a copy of this rank's
    shards fits in host memory, else before this returns. The Session and the HF Trainer
    path both save sharded state through here; ``committer`` tracks the write."""
    committer.wait_shards()  # DCP's collectives of the previous write come first
    group = checkpoint_group()
    where: tuple[str, str | None] | None = None
    if committer.rank == 0:
        ckpts = ctx.checkpoints
        prefix = ckpts.reserve(step)
        local = None
        if ckpts.store.fsspec_target(prefix) is None:
            parent = ctx.staging_dir
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            local = tempfile.mkdtemp(prefix="colabjob-shards-", dir=parent)
        where = (prefix, local)
    if sync is not None:
        where = sync.broadcast(where)
    assert where is not None
    prefix, local = where
    target = shard_target(ctx.checkpoints.store, prefix, local)
    fits = committer.background_fits if background else None
    state = sharded_state(model, optimizer)
    shards = start_shard_write(
        state, target, prefix=prefix, fits=fits, group=group, host=committer.host_copy
    )
    committer.track_shards(shards)
    return shards


def loads_apart(doc: dict[str, Any], model: Any, trainable_only: bool | None) -> bool:
    """Whether the checkpoint whose ``state.json`` is ``doc`` needs ``load_model_state`` for
    the model and optimizer instead of ``restore``: it is sharded (DCP files), or it is
    whole and the live model saves shards (``colabjob.jobs.state.whole_to_sharded``)."""
    sharded = (doc.get("meta") or {}).get(SHARDED_META) == SHARDED_DIR
    return sharded or saves_shards(model, trainable_only)


def load_model_state(directory: Path, doc: dict[str, Any], model: Any, optimizer: Any) -> None:
    """Every rank, together: the model and optimizer of the checkpoint in ``directory``
    (``doc``: its ``state.json``) into the live ones, when ``loads_apart`` says so: DCP files
    resharded for this run (or into a whole model), or whole files cut to this rank's shards."""
    if (doc.get("meta") or {}).get(SHARDED_META) == SHARDED_DIR:
        load_sharded(model, optimizer, directory / SHARDED_DIR)
    else:
        load_whole(model, optimizer, directory)


def _fetch_reported_once(
    checkpoints: CheckpointStore, tmp: str, choice: ResumeChoice | None
) -> CheckpointInfo | None:
    """``fetch_choice`` for a training path: a corrupt checkpoint is reported once, by the
    store's log line (the CLI and a script's stderr show it). The ``CorruptCheckpointWarning``
    copy is meant for direct ``CheckpointStore`` callers; here it would print the same news
    again as a raw ``warnings`` line with a source path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptCheckpointWarning)
        return fetch_choice(checkpoints, tmp, choice)


def fetch_agreed(
    checkpoints: CheckpointStore,
    sync: Coordinator | None,
    tmp: str,
    choice: ResumeChoice | None = None,
) -> CheckpointInfo | None:
    """The checkpoint to resume from (the newest, or ``choice``), downloaded into ``tmp``;
    with several processes rank 0 chooses it (and quarantines bad ones) and the others
    download the same one."""
    if sync is None:
        return _fetch_reported_once(checkpoints, tmp, choice)
    if sync.rank == 0:
        try:
            info = _fetch_reported_once(checkpoints, tmp, choice)
        except BaseException as e:
            sync.broadcast(("error", f"{type(e).__name__}: {e}"))
            raise
        sync.broadcast(("ok", info))
        return info
    status, payload = sync.broadcast(None)
    if status == "error":
        raise ResumeError(f"rank 0 could not load the newest checkpoint: {payload}")
    if payload is not None:
        checkpoints.fetch(payload, tmp)
    return payload


def agree_on_load(
    sync: Coordinator | None, failure: CheckpointError | None
) -> CheckpointError | None:
    """Whether the checkpoint loaded everywhere: with several processes, the first rank's
    failure (as rank 0 sees it) on every rank, so they all fall back together."""
    if sync is None:
        return failure
    failures = sync.gather(None if failure is None else str(failure.args[0]))
    first = next((f for f in failures or () if f is not None), None)
    if sync.rank == 0:
        sync.broadcast(first)
    else:
        first = sync.broadcast(None)
    if first is None:
        return None
    return failure or CorruptCheckpointError(f"another rank could not load it: {first}")


def refuse_silent_restart(ctx: SegmentContext) -> None:
    """No checkpoint to resume from: fine for a new job or ``--from-scratch``; a job whose
    record shows committed progress raises ``NoCheckpointError`` instead of retraining."""
    scratch = ctx.resume is not None and ctx.resume.scratch
    if ctx.committed_step > 0 and not scratch:
        quarantined = quarantined_ids(ctx.checkpoints)
        raise nothing_left(str(ctx.store.url), ctx.committed_step, quarantined)


def seed_missing_rank(base: int, rank: int, got: Restored, say: Callable[[str], None]) -> None:
    """A rank the checkpoint holds no RNGs for (it was written by fewer processes): seed
    its RNGs from ``(base, rank, step)``, so the run is still deterministic."""
    seed_everything(derive_seed(base, "rank", rank, "step", got.counters.step))
    say(
        f"rank {rank}: checkpoint step {got.counters.step} was written by "
        f"{got.world_size} process(es); RNGs seeded from (seed, rank, step)"
    )


def send_rank_state(sync: Coordinator, loader: Any) -> None:
    """A rank other than 0: its RNGs and loader position go to rank 0's snapshot (every
    rank calls this or ``gather_rank_states`` at the same step)."""
    data = deep_cpu_copy(loader.state_dict()) if loader is not None else None
    sync.gather(RankState(rng=capture_rng(), data=data))


def gather_rank_states(sync: Coordinator, snap: Snapshot) -> Snapshot:
    """Rank 0: ``snap`` with the RNGs and loader position of every other rank."""
    ranks = sync.gather(None) or []
    return dataclasses.replace(snap, ranks=tuple(ranks[1:]))
