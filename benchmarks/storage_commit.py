"""Commit cost vs a raw copy of the same bytes with the same client.

A ~200 MB checkpoint (4 files of 50 MB of random bytes) is committed with
``CheckpointStore.save`` (hash every byte, parallel atomic uploads, size check, manifest
last, retention) to (a) local disk and (b) a fake-gcs-server emulator on loopback, and
compared with copying the same files with the same client: for local disk a plain copy
(``shutil.copyfile``) followed by an fsync of each file, since a checkpoint that is not on
disk is not durable (the ratio against a copy without fsync is printed too); for GCS a plain
gcsfs ``put`` of the four files, through the very filesystem object the store uses. Each
figure is the median of 3 alternating runs; ratios are commit time / raw time (target
<= 1.25, i.e. >= 0.8x raw throughput). Reports only; never asserts.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from colabjob.storage.checkpoints import CheckpointStore  # noqa: E402
from colabjob.storage.store import Store, open_store  # noqa: E402
from tests.gcs_emulator import running_emulator  # noqa: E402

N_FILES = 4
FILE_MB = 50
RUNS = 3
BUCKET = "bench"


def make_sources(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(N_FILES):
        path = d / f"shard-{i}.bin"
        path.write_bytes(os.urandom(FILE_MB << 20))
        out[path.name] = path
    return out


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_pair(
    commit: Callable[[int], object],
    raw: Callable[[int], object],
    cleanup: Callable[[], object] = lambda: None,
) -> tuple[float, float]:
    """Median commit and raw time over RUNS alternating runs (noise hits both alike);
    ``cleanup`` runs untimed after each pair."""
    c, r = [], []
    for i in range(RUNS):
        r.append(timed(functools.partial(raw, i)))
        c.append(timed(functools.partial(commit, i)))
        cleanup()
    return statistics.median(c), statistics.median(r)


def copy_fsync(src: Path, dst: Path, *, sync: bool) -> None:
    shutil.copyfile(src, dst)
    if sync:
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())


def bench_local(work: Path, sources: dict[str, Path]) -> dict[str, float]:
    def commit(i: int) -> object:
        store = open_store(str(work / f"commit-{i}"))
        return CheckpointStore(store).save(i, sources)

    def raw(i: int, *, sync: bool = True) -> None:
        dst = work / f"raw-{i}-{sync}"
        dst.mkdir()
        for name, src in sources.items():
            copy_fsync(src, dst / name, sync=sync)

    def cleanup() -> None:
        for d in work.iterdir():
            if d.name != "src":
                shutil.rmtree(d)

    c, r = median_pair(commit, raw, cleanup)
    nosync = [timed(functools.partial(raw, i, sync=False)) for i in range(RUNS)]
    cleanup()
    return {"commit_s": c, "raw_s": r, "raw_nosync_s": statistics.median(nosync)}


def bench_gcs(sources: dict[str, Path]) -> dict[str, float]:
    root = f"gs://{BUCKET}/{uuid.uuid4().hex}"
    store: Store = open_store(root)
    fs = store._clients.fs  # type: ignore[attr-defined]  # the same gcsfs client
    base = f"{BUCKET}/{root.rsplit('/', 1)[1]}"

    def commit(i: int) -> object:
        return CheckpointStore(store.child(f"commit-{i}")).save(i, sources)

    def raw(i: int) -> None:
        names = list(sources)
        fs.put([str(sources[n]) for n in names], [f"{base}/raw-{i}/{n}" for n in names])

    def cleanup() -> None:  # keep the in-memory emulator small
        fs.rm(base, recursive=True)

    c, r = median_pair(commit, raw, cleanup)
    return {"commit_s": c, "raw_s": r}


def main() -> None:
    scratch = REPO / ".bench"
    scratch.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="storage_commit-", dir=scratch))
    try:
        sources = make_sources(work / "src")
        mb = N_FILES * FILE_MB
        local = bench_local(work, sources)
        print(f"local: commit {local['commit_s']:.3f}s, copy+fsync {local['raw_s']:.3f}s, "
              f"copy without fsync {local['raw_nosync_s']:.3f}s ({mb} MB, median of {RUNS})")
        with running_emulator(BUCKET):
            gcs = bench_gcs(sources)
        print(f"gcs emulator: commit {gcs['commit_s']:.3f}s, gcsfs put {gcs['raw_s']:.3f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    nosync = local["commit_s"] / local["raw_nosync_s"]
    print(f"local commit / copy without fsync: {nosync:.3f}")
    result = {
        "bench": "storage_commit",
        "local_time_ratio": round(local["commit_s"] / local["raw_s"], 3),
        "gcs_time_ratio": round(gcs["commit_s"] / gcs["raw_s"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
