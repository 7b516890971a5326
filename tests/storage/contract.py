"""The Store contract as mixins, written once and run unchanged on every backend (fsspec's
``tests/abstract`` style): bytes, files, listing, deletion, moves, children, and the create-only
and compare-and-swap preconditions, including races between threads and between processes.

A backend's test module subclasses ``StoreContract`` (or ``SharedStoreContract`` when separate
processes can reach the same store) and supplies a ``store_url`` fixture giving a fresh, empty
root on that backend; ``store`` opens it with retries that never wait. The subclasses live in
``test_store_contract.py`` (local, memory, GCS emulator) and ``test_drive.py`` (Drive).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from colabjob.errors import (
    AlreadyExistsError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
)
from colabjob.storage import Store, Version, open_store
from colabjob.storage.retry import RetryPolicy

__all__ = ["SharedStoreContract", "StoreContract"]

REPO = Path(__file__).resolve().parents[2]


def _populate(store: Store) -> None:
    for key in ["a/1", "a/b/2", "a/b/c/3", "ab/4", "top", "z/5"]:
        store.write_bytes(key, key.encode())


def _race(n: int, fn: Callable[[int], object]) -> list[object]:
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except StorageError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _increment(store: Store, key: str) -> int:
    """One compare-and-swap increment; returns how many attempts it took."""
    attempts = 0
    while True:
        attempts += 1
        got = store.read_versioned(key)
        assert got is not None
        try:
            store.replace(key, str(int(got[0]) + 1).encode(), got[1])
            return attempts
        except PreconditionFailedError:
            continue


_PROCESS_WORKER = """
import sys
from colabjob.errors import AlreadyExistsError, PreconditionFailedError
from colabjob.storage import open_store
store = open_store(sys.argv[1])
name, rounds = sys.argv[2], int(sys.argv[3])
sys.stdin.readline()  # the barrier: every process is up before any of them starts
try:
    store.create("ctl/lease", name.encode())
    print("won")
except AlreadyExistsError:
    print("lost")
for _ in range(rounds):
    while True:
        data, version = store.read_versioned("ctl/counter")
        try:
            store.replace("ctl/counter", str(int(data) + 1).encode(), version)
            break
        except PreconditionFailedError:
            pass
"""


class StoreContract:
    """Every Store backend passes these. Subclasses supply the ``store_url`` fixture."""

    @pytest.fixture
    def store_url(self) -> str:
        raise NotImplementedError("a backend's subclass supplies the store_url fixture")

    @pytest.fixture
    def store(self, store_url: str, fast_retry: RetryPolicy) -> Store:
        """A fresh, empty Store on the subclass's backend (retries never wait)."""
        return open_store(store_url, retry=fast_retry)

    # ---- bulk objects ----------------------------------------------------------------------

    def test_write_then_read_round_trips_any_bytes(self, store: Store) -> None:
        payload = bytes(range(256)) * 64
        store.write_bytes("dir/blob.bin", payload)
        store.write_bytes("empty", b"")
        store.write_bytes("view", memoryview(b"mv"))  # type: ignore[arg-type]
        assert store.read_bytes("dir/blob.bin") == payload
        assert store.read_bytes("empty") == b""
        assert store.read_bytes("view") == b"mv"

    def test_write_replaces_whole_object(self, store: Store) -> None:
        store.write_bytes("k", b"a much longer first version")
        store.write_bytes("k", b"short")
        assert store.read_bytes("k") == b"short"
        assert store.size("k") == 5

    def test_missing_object_raises_object_not_found(self, store: Store) -> None:
        with pytest.raises(ObjectNotFoundError) as info:
            store.read_bytes("nope/missing")
        assert "nope/missing" in str(info.value)
        assert isinstance(info.value, FileNotFoundError)
        with pytest.raises(ObjectNotFoundError):
            store.size("nope/missing")

    def test_exists_and_size_see_files_not_directories(self, store: Store) -> None:
        store.write_bytes("d/e/f", b"12345")
        assert store.exists("d/e/f")
        assert store.size("d/e/f") == 5
        assert not store.exists("d/e")
        assert not store.exists("d")
        assert not store.exists("other")

    def test_put_file_and_get_file_round_trip(self, store: Store, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(300_000))
        store.put_file(src, "files/x.bin")
        assert store.size("files/x.bin") == 300_000
        dst = tmp_path / "out" / "x.bin"
        dst.parent.mkdir()
        dst.write_bytes(b"stale local copy")
        store.get_file("files/x.bin", dst)
        assert dst.read_bytes() == src.read_bytes()
        assert sorted(p.name for p in dst.parent.iterdir()) == ["x.bin"]  # no temp files left

    def test_get_file_of_missing_object_leaves_nothing(self, store: Store, tmp_path: Path) -> None:
        (tmp_path / "dl").mkdir()
        dst = tmp_path / "dl" / "never.bin"
        with pytest.raises(ObjectNotFoundError):
            store.get_file("missing", dst)
        assert list(dst.parent.iterdir()) == []

    def test_put_file_of_missing_local_file_is_a_clear_error(
        self, store: Store, tmp_path: Path
    ) -> None:
        with pytest.raises(FileNotFoundError, match="no local file"):
            store.put_file(tmp_path / "absent", "k")

    def test_readers_never_see_a_partial_object(self, store: Store) -> None:
        size = 256 * 1024
        versions = [bytes([b]) * size for b in b"abcd"]
        store.write_bytes("hot", versions[0])
        seen: list[bytes] = []
        done = threading.Event()

        def reader() -> None:
            while not done.is_set():
                seen.append(store.read_bytes("hot"))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(12):
                store.write_bytes("hot", versions[i % len(versions)])
        finally:
            done.set()
            thread.join()
        assert seen
        for data in seen:
            assert data in versions, "a reader saw a torn write"

    # ---- listing -----------------------------------------------------------------------------

    def test_list_is_sorted_recursive_files_only(self, store: Store) -> None:
        _populate(store)
        assert store.list() == ["a/1", "a/b/2", "a/b/c/3", "ab/4", "top", "z/5"]

    @pytest.mark.parametrize("prefix", ["a", "a/"])
    def test_list_prefix_is_directory_like(self, store: Store, prefix: str) -> None:
        _populate(store)
        assert store.list(prefix) == ["a/1", "a/b/2", "a/b/c/3"]  # never ab/4
        assert store.list("a/b") == ["a/b/2", "a/b/c/3"]
        assert store.list("top") == []  # a file is not a directory
        assert store.list("missing") == []

    def test_list_dirs_gives_immediate_child_names(self, store: Store) -> None:
        _populate(store)
        assert store.list_dirs() == ["a", "ab", "z"]
        assert store.list_dirs("a") == ["b"]
        assert store.list_dirs("a/b/") == ["c"]
        assert store.list_dirs("a/b/c") == []
        assert store.list_dirs("missing") == []

    def test_list_of_empty_store(self, store: Store) -> None:
        assert store.list() == []
        assert store.list_dirs() == []

    # ---- delete and move ----------------------------------------------------------------------

    def test_delete_removes_and_missing_is_fine(self, store: Store) -> None:
        _populate(store)
        store.delete("z/5")
        store.delete("z/5")
        store.delete("never/was")
        assert not store.exists("z/5")
        assert "z" not in store.list_dirs(), "a directory lives only while it holds objects"

    def test_delete_prefix_removes_only_that_subtree(self, store: Store) -> None:
        _populate(store)
        store.delete_prefix("a/")
        assert store.list() == ["ab/4", "top", "z/5"]
        assert store.list_dirs() == ["ab", "z"]
        store.delete_prefix("missing")
        store.delete_prefix("")
        assert store.list() == []

    def test_move_renames_and_overwrites(self, store: Store) -> None:
        store.write_bytes("staging/x", b"new")
        store.write_bytes("final/x", b"old")
        store.move("staging/x", "final/x")
        assert store.read_bytes("final/x") == b"new"
        assert not store.exists("staging/x")
        assert store.list_dirs() == ["final"]
        with pytest.raises(ObjectNotFoundError):
            store.move("staging/x", "final/y")

    # ---- children and URLs ---------------------------------------------------------------------

    def test_child_is_rooted_below_parent(self, store: Store) -> None:
        job = store.child("jobs/j1/")
        assert job.url == store.url + "/jobs/j1"
        job.write_bytes("ckpt/a", b"1")
        assert store.read_bytes("jobs/j1/ckpt/a") == b"1"
        assert job.list() == ["ckpt/a"]
        assert job.child("ckpt").list() == ["a"]
        assert job.child("ckpt").url == store.child("jobs/j1/ckpt").url
        assert store.child("") is store
        assert store.list_dirs("jobs") == ["j1"]

    def test_url_reopens_the_same_store(self, store: Store, fast_retry: RetryPolicy) -> None:
        store.write_bytes("k", b"v")
        again = open_store(store.url, retry=fast_retry)
        assert again.url == store.url
        assert again.read_bytes("k") == b"v"

    def test_flush_succeeds(self, store: Store) -> None:
        store.write_bytes("k", b"v")
        store.flush()

    def test_crc32c_where_supported(self, store: Store) -> None:
        import google_crc32c

        store.write_bytes("k", b"checksummed")
        got = store.crc32c("k")
        if store.crc32c_supported:
            import base64

            want = base64.b64encode(google_crc32c.Checksum(b"checksummed").digest()).decode()
            assert got == want
        else:
            assert got is None

    @pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/.colabjob-tmp-x"])
    def test_invalid_keys_are_rejected(self, store: Store, key: str) -> None:
        with pytest.raises(ValueError, match="key"):
            store.write_bytes(key, b"x")

    # ---- control objects: create-only and compare-and-swap ----------------------------------

    def test_read_versioned_of_missing_is_none(self, store: Store) -> None:
        assert store.read_versioned("ctl/lease.json") is None

    def test_create_is_create_only(self, store: Store) -> None:
        version = store.create("ctl/lease.json", b'{"owner": "a"}')
        assert isinstance(version, Version)
        with pytest.raises(AlreadyExistsError):
            store.create("ctl/lease.json", b'{"owner": "b"}')
        assert store.read_versioned("ctl/lease.json") == (b'{"owner": "a"}', version)
        assert issubclass(AlreadyExistsError, PreconditionFailedError)

    def test_create_refuses_an_object_written_in_bulk(self, store: Store) -> None:
        store.write_bytes("ctl/x", b"bulk")
        with pytest.raises(AlreadyExistsError):
            store.create("ctl/x", b"ctl")

    def test_create_after_delete_works(self, store: Store) -> None:
        store.create("ctl/x", b"1")
        store.delete("ctl/x")
        store.create("ctl/x", b"2")
        assert store.read_bytes("ctl/x") == b"2"

    def test_replace_with_current_version_succeeds(self, store: Store) -> None:
        v1 = store.create("ctl/rec", b"one")
        v2 = store.replace("ctl/rec", b"two", v1)
        v3 = store.replace("ctl/rec", b"three", v2)
        assert len({v1, v2, v3}) == 3
        assert store.read_versioned("ctl/rec") == (b"three", v3)

    def test_replace_with_stale_version_is_rejected(self, store: Store) -> None:
        v1 = store.create("ctl/rec", b"one")
        store.replace("ctl/rec", b"two", v1)
        with pytest.raises(PreconditionFailedError):
            store.replace("ctl/rec", b"lost update", v1)
        assert store.read_bytes("ctl/rec") == b"two"

    def test_replace_sees_bulk_writes_as_changes(self, store: Store) -> None:
        v1 = store.create("ctl/rec", b"one")
        store.write_bytes("ctl/rec", b"one")  # same bytes, but a new write
        if store.versions_track_writes:
            with pytest.raises(PreconditionFailedError):
                store.replace("ctl/rec", b"two", v1)
        else:  # a Version is a content hash (S3's ETag): identical bytes are no change
            v2 = store.replace("ctl/rec", b"two", v1)
            assert store.read_versioned("ctl/rec") == (b"two", v2)
        v3 = store.read_versioned("ctl/rec")
        assert v3 is not None
        store.write_bytes("ctl/rec", b"other bytes")
        with pytest.raises(PreconditionFailedError):
            store.replace("ctl/rec", b"lost", v3[1])
        assert store.read_bytes("ctl/rec") == b"other bytes"

    def test_replace_of_deleted_object_is_rejected(self, store: Store) -> None:
        v1 = store.create("ctl/rec", b"one")
        store.delete("ctl/rec")
        with pytest.raises(PreconditionFailedError):
            store.replace("ctl/rec", b"two", v1)
        assert not store.exists("ctl/rec")
        assert store.list() == []
        if "://" not in store.url:  # a local directory: not even an empty one comes back (a
            # heartbeat after `rm -rf JOB` must not recreate the job's directories)
            assert not os.path.exists(os.path.join(store.url, "ctl"))

    def test_version_from_read_matches_version_from_write(self, store: Store) -> None:
        v1 = store.create("ctl/rec", b"one")
        read = store.read_versioned("ctl/rec")
        assert read is not None and read[1] == v1
        v2 = store.replace("ctl/rec", b"two", read[1])
        assert store.read_versioned("ctl/rec") == (b"two", v2)

    def test_create_race_between_threads_has_one_winner(
        self, store_url: str, fast_retry: RetryPolicy
    ) -> None:
        stores = [open_store(store_url, retry=fast_retry) for _ in range(6)]
        results = _race(6, lambda i: stores[i].create("ctl/lease", f"owner-{i}".encode()))
        winners = [i for i, r in enumerate(results) if isinstance(r, Version)]
        assert len(winners) == 1, results
        assert all(isinstance(r, AlreadyExistsError) for r in results if not isinstance(r, Version))
        assert stores[0].read_bytes("ctl/lease") == f"owner-{winners[0]}".encode()

    def test_cas_race_between_threads_loses_no_update(
        self, store_url: str, fast_retry: RetryPolicy
    ) -> None:
        stores = [open_store(store_url, retry=fast_retry) for _ in range(4)]
        stores[0].create("ctl/counter", b"0")
        per_thread = 8

        def work(i: int) -> int:
            return sum(_increment(stores[i], "ctl/counter") for _ in range(per_thread))

        _race(4, work)
        assert stores[0].read_bytes("ctl/counter") == str(4 * per_thread).encode()


class SharedStoreContract(StoreContract):
    """The contract plus races between separate interpreters, for backends that other
    processes can reach (``store_url`` must open the same store in a child process)."""

    def test_races_between_processes(self, store_url: str, fast_retry: RetryPolicy) -> None:
        """Separate interpreters (separate clients, locks and caches): exactly one create wins
        and no compare-and-swap increment is lost."""
        open_store(store_url, retry=fast_retry).create("ctl/counter", b"0")
        n, rounds = 3, 5
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _PROCESS_WORKER, store_url, f"p{i}", str(rounds)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                text=True,
            )
            for i in range(n)
        ]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
        assert sorted(out.strip() for out, _ in outs) == ["lost"] * (n - 1) + ["won"]
        store = open_store(store_url, retry=fast_retry)
        assert store.read_bytes("ctl/counter") == str(n * rounds).encode()
        assert store.read_bytes("ctl/lease").decode() in {f"p{i}" for i in range(n)}
