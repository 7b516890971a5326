"""Checkpoint memory: streaming tensor files, the background-or-synchronous choice, and a job
that cannot afford a copy of its state committing and resuming bit-identically.

The writer (``colabjob.jobs.state.tensorfile``) must produce files safetensors itself reads, for
every dtype and layout, and free a consumed snapshot as it goes; the reader must refuse a
damaged file before any weight changes. ``colabjob.jobs.state.host_memory`` reads free memory from
``/proc/meminfo`` and the cgroup files (here through an injected reader). The job test runs
``memory_child`` (the Session API through ``colabjob.session``) with a free-memory reading
too small for a copy: it must say so, save synchronously, survive a SIGKILL and end with the
same final checkpoint as a run saving in the background.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colabjob.errors import CorruptCheckpointError
from colabjob.jobs.state import host_memory as memory
from colabjob.jobs.state.capture import snapshot, write_snapshot
from colabjob.jobs.state.codec import decode
from colabjob.jobs.state.format import Counters, Snapshot
from colabjob.jobs.state.host_memory import SaveChooser, available_bytes, parse_async, plan_save
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.tensorfile import TensorFile, write_tensors
from colabjob.jobs.state.tracked import Tracked
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore

from .helpers import TinyNet, tiny_gpt2

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from .kind_fixtures import tiny_model_dir, write_text_data

    root = tmp_path_factory.mktemp("hf-assets")
    data = write_text_data(root / "data", docs=30, words=40)
    return {"data": data, "model": tiny_model_dir(root / "model", data)}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    out = {
        f"d/{dtype}": (base * 10).to(dtype)
        for dtype in (
            torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
            torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        )
    }  # fmt: skip
    out["empty"] = torch.empty(0, 3)
    out["scalar"] = torch.tensor(3.5)
    out["strided"] = base.t()  # not contiguous
    out["slice"] = base[1:4, ::2]  # a view with an offset into a larger storage
    return out


def test_streamed_file_is_a_safetensors_file(tmp_path: Path) -> None:
    src = _tensors()
    write_tensors(tmp_path / "t.safetensors", dict(src), metadata={"k": "v"})
    theirs = load_file(str(tmp_path / "t.safetensors"))
    assert set(theirs) == set(src)
    for k, t in src.items():
        assert theirs[k].dtype == t.dtype and torch.equal(theirs[k], t), k
    with TensorFile(tmp_path / "t.safetensors") as f:
        assert f.metadata == {"k": "v"}
        for k, t in src.items():
            assert torch.equal(f.get(k), t), k
        out = torch.zeros(6, 5, dtype=torch.float64)  # another dtype: converted on the way
        assert torch.equal(f.read_into("d/torch.float32", out), src["d/torch.float32"].double())


def test_consume_empties_the_mapping_as_it_writes(tmp_path: Path) -> None:
    src = _tensors()
    held = dict(src)
    write_tensors(tmp_path / "t.safetensors", held, consume=True)
    assert held == {}
    assert set(load_file(str(tmp_path / "t.safetensors"))) == set(src)


@pytest.mark.parametrize("damage", ["truncate", "header", "grow"])
def test_damaged_tensor_file_is_refused_before_loading(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t.safetensors"
    write_tensors(path, _tensors())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-7])
    elif damage == "header":
        path.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        path.write_bytes(data + b"\0")
    with pytest.raises(CorruptCheckpointError):
        TensorFile(path)


def _assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, type(a)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def _trained_gpt2(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """Tied embeddings, AdamW over two param groups (with and without decay), a scheduler."""
    model = tiny_gpt2(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-2
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    return model, opt, sched


@pytest.mark.parametrize("clone", [True, False])
def test_snapshot_round_trip_with_tied_weights_and_param_groups(
    tmp_path: Path, clone: bool
) -> None:
    model, opt, sched = _trained_gpt2(0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    tracked = Tracked(model=model, optimizer=opt, scheduler=sched)
    snap = snapshot(tracked, counters=Counters(step=1), clone=clone)
    assert snap.live is not clone
    write_snapshot(snap, tmp_path, consume=True)
    assert snap.model == {} and snap.optimizer == {}  # freed as written
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["model"]["aliases"] == {"lm_head.weight": "transformer.wte.weight"}

    fresh, fresh_opt, fresh_sched = _trained_gpt2(1)
    restore(tmp_path, Tracked(model=fresh, optimizer=fresh_opt, scheduler=fresh_sched))
    _assert_same(weights, fresh.state_dict())
    _assert_same(opt.state_dict(), fresh_opt.state_dict())
    assert fresh_sched.state_dict() == sched.state_dict()
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()  # still tied


def test_live_and_copied_snapshots_write_the_same_bytes(tmp_path: Path) -> None:
    model, opt, sched = _trained_gpt2(0)
    for clone in (True, False):
        tracked = Tracked(model=model, optimizer=opt, scheduler=sched)
        snap = snapshot(tracked, counters=Counters(step=1), clone=clone, capture_rngs=False)
        write_snapshot(snap, tmp_path / str(clone))
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "True" / name).read_bytes() == (tmp_path / "False" / name).read_bytes()


def test_optimizer_file_loads_without_unpickling(tmp_path: Path) -> None:
    model, opt, sched = _trained_gpt2(0)
    tracked = Tracked(model=model, optimizer=opt, scheduler=sched)
    write_snapshot(snapshot(tracked, counters=Counters(step=1)), tmp_path)
    tensors = load_file(str(tmp_path / "optimizer.safetensors"))  # plain safetensors
    with TensorFile(tmp_path / "optimizer.safetensors") as f:
        state = decode(json.loads(f.metadata["tree"]), tensors)
    _assert_same(opt.state_dict(), state["optimizer"])
    assert not (tmp_path / "optimizer.pt").exists()


def test_older_checkpoint_with_optimizer_pt_still_loads(tmp_path: Path) -> None:
    model, opt, sched = _trained_gpt2(0)
    tracked = Tracked(model=model, optimizer=opt, scheduler=sched)
    write_snapshot(snapshot(tracked, counters=Counters(step=1)), tmp_path)
    # What colabjob 0.1 wrote: optimizer.pt (torch.save) and no "optimizer_file" entry.
    legacy = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": None}
    torch.save(legacy, tmp_path / "optimizer.pt")
    (tmp_path / "optimizer.safetensors").unlink()
    doc = json.loads((tmp_path / "state.json").read_text())
    del doc["optimizer_file"]
    (tmp_path / "state.json").write_text(json.dumps(doc))
    fresh, fresh_opt, fresh_sched = _trained_gpt2(1)
    restore(tmp_path, Tracked(model=fresh, optimizer=fresh_opt, scheduler=fresh_sched))
    _assert_same(opt.state_dict(), fresh_opt.state_dict())


def test_weights_of_another_shape_are_refused_untouched(tmp_path: Path) -> None:
    torch.manual_seed(0)
    write_snapshot(snapshot(Tracked(model=TinyNet()), counters=Counters()), tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(8, 17), torch.nn.ReLU(), torch.nn.Dropout(),
                                torch.nn.Linear(17, 3))  # fmt: skip
    wrapped = torch.nn.Module()
    wrapped.body = other
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(Exception, match="shape"):
        restore(tmp_path, Tracked(model=wrapped))
    _assert_same(before, wrapped.state_dict())


def test_a_finished_background_commit_releases_its_snapshot(tmp_path: Path) -> None:
    store = CheckpointStore(open_store(str(tmp_path / "store")))
    model = TinyNet()
    snap = snapshot(Tracked(model=model), counters=Counters(step=1))
    probe = weakref.ref(next(iter(snap.model.values())))  # type: ignore[union-attr]

    def writer(s: Snapshot) -> Callable[[Path], dict[str, Path]]:
        return lambda d: write_snapshot(s, d, consume=True)

    pending = store.save_async(1, writer(snap))
    del snap
    pending.wait()
    gc.collect()
    assert probe() is None  # neither the snapshot nor the store's last commit holds it
    assert store.pending is pending


# ---- how much memory there is, and the choice ---------------------------------------------

GB = 10**9


def _reader(files: dict[str, str]) -> memory.Reader:
    return lambda path: files.get(path)


def test_available_memory_is_the_smaller_of_meminfo_and_cgroup() -> None:
    meminfo = "MemTotal: 16000000 kB\nMemAvailable:    8000000 kB\n"
    assert available_bytes(_reader({"/proc/meminfo": meminfo})) == 8_192_000_000
    v2 = {"/sys/fs/cgroup/memory.max": "5000000000\n", "/sys/fs/cgroup/memory.current": "1000"}
    assert available_bytes(_reader({"/proc/meminfo": meminfo, **v2})) == 5_000_000_000 - 1000
    unlimited = {"/sys/fs/cgroup/memory.max": "max\n", "/sys/fs/cgroup/memory.current": "1000"}
    assert available_bytes(_reader({"/proc/meminfo": meminfo, **unlimited})) == 8_192_000_000
    v1 = {
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": "3000000000",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes": "1000000000",
    }
    assert available_bytes(_reader({"/proc/meminfo": meminfo, **v1})) == 2 * GB
    assert available_bytes(_reader({})) is None
    assert (available_bytes() or 1) > 0  # this machine's real files parse


def test_plan_save() -> None:
    assert plan_save("auto", 6 * GB, 20 * GB).background
    tight = plan_save("auto", 6 * GB, 7 * GB)  # a copy fits, but not with the margin
    assert not tight.background and tight.reason and "6.0 GB" in tight.reason
    assert plan_save("auto", 6 * GB, None).background  # unknown: the default
    assert plan_save("true", 6 * GB, 1).background
    assert not plan_save("false", 1, 100 * GB).background
    got = [parse_async(v) for v in (True, False, "auto", "TRUE")]
    assert got == ["true", "false", "auto", "true"]
    with pytest.raises(ValueError, match="auto, true or false"):
        parse_async("sometimes")


def test_chooser_says_a_change_of_mode_once(monkeypatch: pytest.MonkeyPatch) -> None:
    free = [100 * GB]
    monkeypatch.setattr(memory, "available_bytes", lambda read=None: free[0])
    said: list[str] = []
    status: list[dict[str, object]] = []
    chooser = SaveChooser("auto", say=said.append, on_status=status.append)
    assert chooser.background(GB) and chooser.background(GB)
    free[0] = GB
    assert not chooser.background(GB) and not chooser.background(GB)
    free[0] = 100 * GB
    assert chooser.background(GB)
    assert len(said) == 2 and "saving synchronously" in said[0] and "again" in said[1]
    assert status[0]["checkpoint_mode"] == "background"
    assert str(status[1]["checkpoint_mode"]).startswith("synchronous")
    assert len(status) == 3


# ---- a job that cannot afford a copy --------------------------------------------------------

TOTAL = 10


def _child(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tests.jobs.memory_child", str(store), "--total", str(TOTAL),
           *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _final(store: Path, into: Path) -> dict[str, object]:
    info = CheckpointStore(open_store(str(store))).fetch_latest(into)
    assert info is not None and info.step == TOTAL
    with TensorFile(into / "optimizer.safetensors") as f:
        opt = decode(json.loads(f.metadata["tree"]), dict(f.items()))
    return {
        "model": load_file(str(into / "model.safetensors")),
        "optimizer": opt,
        "metrics": (into / "metrics.json").read_text(),
    }


@pytest.mark.slow
def test_short_of_memory_a_job_saves_synchronously_and_resumes_exactly(tmp_path: Path) -> None:
    straight = _child(tmp_path / "straight", "--async-checkpoint", "true")
    assert straight.returncode == 0, straight.stderr
    assert "synchronously" not in straight.stdout

    killed = _child(tmp_path / "tight", "--free", "4096", "--kill", "step:26")  # in step 7
    assert killed.returncode == -9, killed.stderr
    assert killed.stdout.count("does not fit twice in host memory") == 1, killed.stdout
    assert "checkpoint step 6 committed" in killed.stdout
    resumed = _child(tmp_path / "tight", "--free", "4096")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint step 6" in resumed.stdout, resumed.stdout
    assert "saving synchronously" in resumed.stdout

    want = _final(tmp_path / "straight", tmp_path / "a")
    _assert_same(want, _final(tmp_path / "tight", tmp_path / "b"))


@pytest.mark.slow
def test_hf_trainer_short_of_memory_saves_synchronously_and_resumes_exactly(
    hf_assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from colabjob.jobs.checkpointing.committer import Committer
    from colabjob.jobs.demo import compare_final_weights
    from colabjob.runner.signals import forget_completion
    from tests.fakes import FakeClock

    from .test_hf import user_script

    clock = FakeClock()
    straight = user_script(tmp_path / "straight", hf_assets, tmp_path / "o1", clock=clock,
                           budget="10h", every_steps=2, async_checkpoint=True)  # fmt: skip
    assert straight.colabjob_outcome.completed

    monkeypatch.setattr(memory, "available_bytes", lambda read=None: 4096)
    live: list[bool] = []
    save_async = Committer.save_async

    def spy(self: Committer, snap: Snapshot, **kw: object) -> None:
        live.append(snap.live)
        save_async(self, snap, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Committer, "save_async", spy)
    for _ in range(8):
        trainer = user_script(tmp_path / "split", hf_assets, tmp_path / "o2", clock=clock,
                              budget="400s", save_guess="5m", exit_on_pause=False,
                              every_steps=2)  # fmt: skip
        if trainer.colabjob_outcome.completed:
            break
    # A completed job keeps its note-and-survive signal handlers (runner.signals): put the
    # defaults back so later tests start from them.
    forget_completion([signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
    assert trainer.colabjob_outcome.completed
    assert live and all(live)  # every periodic save took the synchronous path
    assert compare_final_weights(tmp_path / "straight", tmp_path / "split")
