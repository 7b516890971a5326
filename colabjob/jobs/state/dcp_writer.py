"""Every rank's DCP write of a sharded (FSDP2) checkpoint, hashed as it streams.

``start_shard_write`` runs on every rank at the same step. It takes the ``get_state_dict``
view of the model and optimizer and hands it to DCP with a ``HashingWriter`` (DCP's
``FsspecWriter``, subclassed) pointed at a ``ShardTarget``: the checkpoint's own prefix in
the store (an fsspec filesystem and path from ``Store.fsspec_target``), so that rank 0's
commit lists the files where they lie instead of re-reading and copying them; or, for a
store fsspec cannot reach from every process (``memory://``), a local folder moved into the
commit's staging directory. Every file's size and sha256 are computed from the bytes as they
are written; each rank's digests travel to the coordinator (rank 0) inside DCP's own write
results, so rank 0 learns them when DCP finishes, which is also when every rank's write has
finished (DCP's final collective), and ``ShardWrite.wait`` returns them as ``Written``
sources for the manifest.

In the background (``dcp.async_save``, a thread) the loop waits only for ``get_state_dict``
and one copy of this rank's shards in host memory (``HostCopy``, buffers kept for the next
save: the same single copy as the unsharded path; ``fits`` says whether it fits, else DCP
writes the live tensors synchronously). DCP's planning and final collectives then run on
that thread, on a process group of their own (``checkpoint_group``), never on the one the
training loop uses. The hashing filesystem under the writer is ``hashing_fs``'s.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import WriteResult

from colabjob.errors import CheckpointError
from colabjob.jobs.state.hashing_fs import Digests, HashingFileSystem
from colabjob.storage.staging import Written

__all__ = [
    "HashingWriter",
    "HostCopy",
    "ShardTarget",
    "ShardWrite",
    "checkpoint_group",
    "local_nbytes",
    "shard_target",
    "start_shard_write",
]

log = logging.getLogger(__name__)

_DIGESTS = "__colabjob_digests__"  # the WriteResult that carries a rank's digests (removed)
_META_TMP, _META = ".metadata.tmp", ".metadata"  # DCP writes the metadata then renames it


@dataclass(frozen=True, kw_only=True)
class ShardTarget:
    """Where the DCP files go: ``path`` on the fsspec filesystem ``fs``; ``in_place``: the
    checkpoint's own ``dcp/`` folder in the store (else a local folder that the commit
    moves into its staging directory); ``sync_files``: fsync each file (local disks)."""

    fs: Any
    path: str
    in_place: bool
    sync_files: bool


@contextmanager
def _no_zip_crc() -> Iterator[None]:
    """``torch.save`` (DCP's format for each tensor) without the CRC32 of each zip record:
    the manifest's sha256 of every file already covers those bytes, and is what a load
    verifies; the CRC was ~0.2 s of CPU per 300 MB rank. torch's flag is process-wide, so a
    ``torch.save`` of the user's on another thread during the write skips it too (its file
    still loads: torch's reader does not check it)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class HashingWriter(FsspecWriter):
    """``FsspecWriter`` into ``target`` that hashes every file while writing it and, on the
    coordinator, collects every rank's digests in ``all_digests`` (see the module)."""

    def __init__(self, target: ShardTarget) -> None:
        super().__init__(target.path, sync_files=target.sync_files)
        self.target = target
        self.digests: Digests = {}  # this rank's files
        self.all_digests: Digests = {}  # the coordinator's: every rank's files and .metadata
        self.fs = HashingFileSystem(  # type: ignore[assignment]
            target.fs, self.digests, kick=target.sync_files
        )
        self.path = target.path

    def write_data(
        self, plan: SavePlan, planner: SavePlanner
    ) -> torch.futures.Future[list[WriteResult]]:
        with _no_zip_crc():
            results = super().write_data(plan, planner).wait()  # written when it returns
        digests = WriteResult(
            index=MetadataIndex(fqn=_DIGESTS), size_in_bytes=0, storage_data=dict(self.digests)
        )
        out: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        out.set_result([*results, digests])
        return out

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        gathered: Digests = {}
        clean = []
        for rank_results in results:
            for r in rank_results:
                if r.index.fqn == _DIGESTS:
                    gathered.update(r.storage_data)
            clean.append([r for r in rank_results if r.index.fqn != _DIGESTS])
        super().finish(metadata, clean)
        gathered[_META] = self.digests[_META]
        if self.target.sync_files:  # the new names must survive a crash, like their bytes
            _fsync_dir(self.target.path)
            _fsync_dir(posixpath.dirname(self.target.path))
        self.all_digests = gathered


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a filesystem that cannot fsync a directory: its renames are as durable as any
    finally:
        os.close(fd)


class ShardWrite:
    """One rank's DCP write of one checkpoint (see the module); ``prefix`` is the
    checkpoint's key prefix in the store that rank 0 reserved."""

    def __init__(self, prefix: str, writer: HashingWriter, future: Future[Any] | None) -> None:
        self.prefix, self.writer, self._future = prefix, writer, future

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def result(self) -> None:
        """Wait for this rank's write (and, through DCP, every rank's); re-raise its error."""
        if self._future is not None:
            self._future.result()

    def wait(self, staging: Path) -> dict[str, Written | Path]:
        """Rank 0, on the commit thread: every rank's files as commit sources named
        ``<sub>/<file>``: ``Written`` where they lie in the checkpoint's prefix, or moved
        from the local folder into ``staging/<sub>/``. ``sub`` is the target's last part."""
        self.result()
        target = self.writer.target
        sub = posixpath.basename(target.path.rstrip("/"))
        digests = self.writer.all_digests
        if target.in_place:
            return {f"{sub}/{n}": Written(size=s, sha256=h) for n, (s, h) in digests.items()}
        missing = sorted(n for n in digests if not os.path.isfile(os.path.join(target.path, n)))
        if missing:
            raise CheckpointError(
                f"sharded checkpoint: rank 0 does not see {missing[:3]} in {target.path}",
                hint="every rank writes its shards into rank 0's staging directory: run the "
                "ranks on one machine, or set checkpoint.staging_dir to a shared filesystem",
            )
        dest = staging / sub
        dest.mkdir(parents=True, exist_ok=True)
        out: dict[str, Written | Path] = {}
        for name in sorted(digests):
            shutil.move(os.path.join(target.path, name), dest / name)
            out[f"{sub}/{name}"] = dest / name
        shutil.rmtree(posixpath.dirname(target.path), ignore_errors=True)  # our temp folder
        return out


class HostCopy(AsyncStager):
    """DCP's stager for a background write: this rank's shards copied into host buffers
    made at the first save and reused by the next ones (a copy into memory already mapped
    costs about half a fresh one: no page faults). They stay allocated between saves: one
    copy of the rank's state, the bound of a background save; ``clear()`` frees them (a
    synchronous save does). The caller makes sure the previous write finished first."""

    _synchronize_after_execute = False

    def __init__(self) -> None:
        self._cache: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return local_nbytes(self._cache) if self._cache is not None else 0

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._cache is not None:
            try:
                return _copy_state_dict(state_dict, self._cache, type_check=False)
            except (RuntimeError, ValueError, TypeError, KeyError):
                self._cache = None  # another structure or shapes (a new optimizer state)
        self._cache = _host_buffers(state_dict)
        return _copy_state_dict(state_dict, self._cache, type_check=False)

    def synchronize_staging(self) -> None:
        """The copy is made in ``stage`` (on the training thread): nothing to wait for."""

    def clear(self) -> int:
        freed, self._cache = self.nbytes, None
        return freed

    def close(self) -> None:
        self.clear()


def _host_buffers(state: Any) -> Any:
    """Empty CPU tensors shaped like ``state``'s, for ``_copy_state_dict`` to fill; a DTensor
    gets one for its local shard, in a new wrapper (``detach()``: no copy) of the same
    placement. torch's ``_create_cpu_state_dict`` deep-copies a CPU DTensor first: its whole
    storage, a second copy while it runs, and one that fails ("invalid python storage") on
    a shard that views a larger tensor, as transformers' loading leaves them on CPU."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return {k: _host_buffers(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_host_buffers(v) for v in state)
    if isinstance(state, DTensor):
        if state.ndim == 0:
            return state
        buf: Any = state.detach()
        buf._local_tensor = _empty_cpu(state.to_local())
        return buf
    if isinstance(state, torch.Tensor):
        return _empty_cpu(state)
    return state


def _empty_cpu(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 0:
        return torch.tensor(0, dtype=t.dtype)
    return torch.empty(tuple(t.shape), dtype=t.dtype)


class _Group:
    handle: Any = None  # the checkpoint writes' own gloo group
    world: Any = None  # the default group it was made for


def checkpoint_group() -> Any:
    """A gloo group over every rank for DCP's collectives on the write thread (None without
    a process group); every rank must call it at the same point the first time."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _Group.handle is None or _Group.world is not dist.group.WORLD:
        _Group.world, _Group.handle = dist.group.WORLD, dist.new_group(backend="gloo")
    return _Group.handle


def local_nbytes(state: Any) -> int:
    """Bytes of this rank's tensors in a (nested) state dict; a DTensor counts its shard."""
    from torch.distributed.tensor import DTensor

    def walk(x: Any) -> Iterator[torch.Tensor]:
        if isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                yield from walk(v)
        elif isinstance(x, DTensor):
            yield x.to_local()
        elif isinstance(x, torch.Tensor):
            yield x

    return sum(t.numel() * t.element_size() for t in walk(state))


def start_shard_write(
    state: dict[str, Any],
    target: ShardTarget,
    *,
    prefix: str,
    fits: Callable[[int], bool] | None,
    group: Any,
    host: HostCopy | None = None,
) -> ShardWrite:
    """Every rank: write ``state`` (this rank's ``get_state_dict`` view) into ``target``; in
    the background, from a copy in ``host`` (a fresh ``HostCopy`` if None), when ``fits``
    (this rank's bytes) says a copy fits, else now, from the live tensors."""
    writer = HashingWriter(target)
    no_dist = group is None
    if fits is not None and fits(local_nbytes(state)):
        future = dcp.async_save(
            state,
            storage_writer=writer,
            process_group=group,
            no_dist=no_dist,
            async_stager=host or HostCopy(),
        )
        return ShardWrite(prefix, writer, future)  # type: ignore[arg-type]
    if host is not None:
        host.clear()  # no room for a copy: nor for the one kept from the last save
    dcp.save(state, storage_writer=writer, process_group=group, no_dist=no_dist)
    return ShardWrite(prefix, writer, None)


def shard_target(store: Any, prefix: str, local: str | None) -> ShardTarget:
    """Where this rank writes: ``<prefix>/dcp`` in ``store`` through fsspec, or ``local``
    (a folder every rank sees) when the store offers no fsspec target."""
    from fsspec.implementations.local import LocalFileSystem

    from colabjob.jobs.state.sharded import SHARDED_DIR

    if local is not None:
        path = os.path.join(local, SHARDED_DIR)
        return ShardTarget(fs=LocalFileSystem(auto_mkdir=True), path=path, in_place=False,
                           sync_files=False)  # fmt: skip
    got = store.fsspec_target(f"{prefix}/{SHARDED_DIR}")
    if got is None:
        raise ValueError(f"{store!r} offers no fsspec target: pass a local folder")
    fs, path = got
    return ShardTarget(fs=fs, path=path, in_place=True, sync_files=isinstance(fs, LocalFileSystem))
