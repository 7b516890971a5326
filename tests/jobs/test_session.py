"""The Session API in-process: exact resume after graceful stops, O(1) seeks, geometry,
the checkpoint schedule (async, deferred, retried, fenced) and the hot path's silence.

Sessions here get a hand-built ``SegmentContext`` over a local store and a test
``StopPolicy``; the runner's version (lease, record, watchdog) is tested in
``tests/runner/test_segment.py`` and the SIGKILL matrix in ``test_equivalence.py``.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from colabjob.errors import (
    CheckpointError,
    ConfigError,
    GeometryChangedError,
    StaleEpochError,
)
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.data import ResumableIterable, make_loader
from colabjob.jobs.policy import NeverStop, StopPolicy, StopReason
from colabjob.jobs.session import Session
from colabjob.jobs.state.rng import GeneratorState
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore
from tests.fakes import FakeClock

from .equiv_child import Objects, build, train
from .helpers import CountingDataset, NoisyDataset, TinyNet, assert_same_model

TOTAL = 12
WAIT = 10.0  # bound for a background thread to get somewhere; never a deadline under test


class StopAfter(StopPolicy):
    """A StopPolicy that stops once the bound session reaches optimizer step ``at`` (None:
    never) with ``reason``, and asks for a checkpoint at the steps in ``due``."""

    def __init__(
        self, at: int | None, reason: str = "budget", *, due: frozenset[int] = frozenset()
    ):
        self.at, self.reason, self.due = at, StopReason(reason), due
        self.session: Session | None = None
        self.preempted = False
        self.observed: list[float] = []
        self.checkpoints: list[dict[str, Any]] = []

    def bind(self, s: Session) -> Session:
        self.session = s
        return s

    def observe_step(self, seconds: float) -> None:
        self.observed.append(seconds)

    def observe_checkpoint(self, *, write_seconds: float, upload_seconds: float, nbytes: int):
        self.checkpoints.append({"write": write_seconds, "upload": upload_seconds, "n": nbytes})

    @property
    def emergency(self) -> bool:
        return self.preempted

    def should_stop(self) -> StopReason | None:
        assert self.session is not None, "bind() the policy to its session"
        if self.at is not None and self.session.global_step >= self.at:
            self.preempted = self.reason is StopReason.PREEMPTION
            return self.reason
        return None

    def checkpoint_due(self) -> bool:
        return self.session is not None and self.session.global_step in self.due


def make_ctx(root: Path, **kw: Any) -> SegmentContext:
    store = open_store(root)
    fence = kw.pop("fence", None)
    kw.setdefault("log_every_steps", 1)
    return SegmentContext(store=store, checkpoints=CheckpointStore(store, fence=fence), **kw)


def test_policy_is_a_stop_policy() -> None:
    assert isinstance(StopAfter(1), StopPolicy)


# ---- bit-identical resume after graceful stops -------------------------------------------


def _run(root: Path, config: str, cuts: list[int], rng: random.Random, **kw: Any) -> Objects:
    """Train to TOTAL in segments ending at ``cuts``; each later segment starts from fresh
    objects built from another seed and must restore everything from the checkpoint."""
    reasons = ["budget", "signal", "stop_request", "preemption"]
    start, objs = 0, None
    log_every = kw.pop("log_every_steps", 1)
    for i, end in enumerate([*cuts, TOTAL]):
        objs = build(config, init_seed=1000 * i, total=TOTAL)
        last = end == TOTAL
        policy = NeverStop() if last else StopAfter(end, reasons[i % len(reasons)])
        ctx = make_ctx(
            root,
            policy=policy,
            max_steps=TOTAL,
            every_steps=rng.choice([1, 2, 3, None]),
            log_every_steps=log_every,
        )
        with Session(ctx) as s:
            if isinstance(policy, StopAfter):
                policy.bind(s)
            kw.get("track", Objects.track)(objs, s)
            assert s.global_step == start
            train(s, objs)
        out = s.outcome
        assert out is not None
        expected = "completed" if last else reasons[i % len(reasons)]
        assert (out.stop_reason, out.first_step, out.last_step) == (expected, start, end)
        assert out.checkpoint_step == end and out.completed == last
        assert ctx.checkpoints.latest().step == end  # type: ignore[union-attr]
        start = end
    assert objs is not None
    objs.metrics = s.metrics  # type: ignore[attr-defined]
    return objs


@pytest.mark.parametrize(
    ("config", "log_every"), [("map", 1), ("workers", 1), ("iterable", 3), ("plain", 5)]
)
def test_graceful_split_is_bit_identical(tmp_path: Path, config: str, log_every: int) -> None:
    """Dropout, AdamW, warmup LambdaLR, GradScaler, accumulation 4 (or none), map-style
    with 0 or 2 workers or an HF iterable: segments split at seeded random points."""
    rng = random.Random(f"split-{config}")
    straight = _run(tmp_path / "straight", config, [], rng, log_every_steps=log_every)
    cuts = sorted(rng.sample(range(1, TOTAL), rng.randint(1, 4)))  # 2 to 5 segments
    split = _run(tmp_path / "split", config, cuts, rng, log_every_steps=log_every)
    assert len(straight.metrics) == TOTAL // log_every  # type: ignore[attr-defined]
    assert split.metrics == straight.metrics  # type: ignore[attr-defined]
    assert_same_model(straight.model, split.model)
    for a, b in zip(straight.optimizer.state.values(), split.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_comparison_can_fail(tmp_path: Path) -> None:
    """Leave the scheduler out of track(): the resumed run's learning rates differ."""

    def track(o: Objects, s: Session) -> Any:
        return s.track(model=o.model, optimizer=o.optimizer, scaler=o.scaler, loader=o.loader)

    rng = random.Random(1)
    straight = _run(tmp_path / "a", "plain", [], rng, track=track)
    split = _run(tmp_path / "b", "plain", [5], rng, track=track)
    assert split.metrics[:5] == straight.metrics[:5]  # type: ignore[attr-defined]
    assert split.metrics[5:] != straight.metrics[5:]  # type: ignore[attr-defined]


# ---- O(1) resume ---------------------------------------------------------------------------


def _resume_reads(root: Path, position: int, *, iterable: bool) -> tuple[int, list[int]]:
    """Commit a checkpoint one batch after ``position``, then count the dataset reads a new
    session makes to resume there and produce one batch."""
    reads = [0]

    def open_at(offset: int) -> Iterator[int]:
        i = offset
        while True:
            reads[0] += 1
            yield i
            i += 1

    def loader() -> Any:
        data: Any = ResumableIterable(open_at) if iterable else CountingDataset(10**6)
        return make_loader(data, batch_size=5, seed=3)

    first = loader()
    if iterable:
        first.dataset.load_state_dict({"epoch": 0, "position": position})
    else:
        sampler = first.resumable_sampler
        sampler.load_state_dict({**sampler.state_dict(), "offset": position})
    with Session(make_ctx(root, max_steps=1)) as s:
        s.track(loader=first)
        for _ in s.batches():
            if s.step():
                break
    second = loader()
    reads[0] = 0
    with Session(make_ctx(root, max_steps=2)) as s:
        s.track(loader=second)
        calls_before = reads[0] if iterable else second.dataset.calls
        assert calls_before == 0
        batch = next(iter(s.batches()))
        got = reads[0] if iterable else second.dataset.calls
    return got, batch.tolist()


@pytest.mark.parametrize("iterable", [False, True])
def test_resume_reads_as_much_at_sample_100000_as_at_10(tmp_path: Path, iterable: bool) -> None:
    near, near_batch = _resume_reads(tmp_path / "near", 10, iterable=iterable)
    far, far_batch = _resume_reads(tmp_path / "far", 100_000, iterable=iterable)
    assert far == near <= 6  # one batch of 5 (+1 for the generator's look-ahead at most)
    if iterable:
        assert far_batch == list(range(100_005, 100_010))
    else:
        order = make_loader(CountingDataset(10**6), batch_size=5, seed=3).resumable_sampler
        assert far_batch == order.order(0)[100_005:100_010].tolist()  # type: ignore[union-attr]
    assert near_batch != far_batch


# ---- batch geometry --------------------------------------------------------------------------


def _geometry_session(root: Path, batch_size: int, **kw: Any) -> tuple[Session, TinyNet]:
    torch.manual_seed(0)
    model = TinyNet()
    loader = make_loader(NoisyDataset(40), batch_size=batch_size, seed=5)
    s = Session(make_ctx(root, **kw))
    s.track(model=model, loader=loader, grad_accum=2)
    return s, model


def test_geometry_change_is_refused_then_allowed(tmp_path: Path) -> None:
    s, _ = _geometry_session(tmp_path, 4, max_steps=2)
    for _ in s.batches():
        if s.step():
            break
    assert s.close().checkpoint_step == 2 and s.counters.samples_seen == 16

    fresh = TinyNet()
    with pytest.raises(GeometryChangedError) as info:
        _geometry_session(tmp_path, 8)
    text = str(info.value)
    assert "batch_size 4 -> 8" in text and "--allow-geometry-change" in text
    assert "samples per optimizer step 8 -> 16" in text

    with pytest.warns(UserWarning, match="changed batch geometry"):
        s, model = _geometry_session(tmp_path, 8, allow_geometry_change=True)
    assert s.global_step == 2 and s.counters.samples_seen == 16
    assert not torch.equal(model.body[0].weight, fresh.body[0].weight)  # restored
    batch = next(iter(s.batches()))
    order = make_loader(NoisyDataset(40), batch_size=8, seed=5).resumable_sampler.order(0)  # type: ignore[union-attr]
    assert batch["index"].tolist() == order[16:24].tolist()  # the next unseen samples


def test_a_loader_without_state_is_refused(tmp_path: Path) -> None:
    plain = torch.utils.data.DataLoader(NoisyDataset(8), batch_size=4)
    with pytest.raises(ConfigError, match="make_loader"):
        Session(make_ctx(tmp_path)).track(loader=plain)


# ---- the checkpoint schedule -------------------------------------------------------------------


def _steps(s: Session, n: int) -> list[bool]:
    """Call step() ``n`` times (no real training: the state is still a valid checkpoint)."""
    return [s.step(loss=1.0) for _ in range(n)]


def _tracked(ctx: SegmentContext, **kw: Any) -> Session:
    torch.manual_seed(0)
    model = TinyNet()
    s = Session(ctx)
    if isinstance(ctx.policy, StopAfter):
        ctx.policy.bind(s)
    s.track(model=model, optimizer=torch.optim.AdamW(model.parameters()), batch_size=4, **kw)
    return s


def test_upload_runs_in_the_background_one_at_a_time(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, every_steps=1)
    gate, puts = threading.Event(), []
    put = ctx.store.put_file

    def gated_put(src: Any, key: str) -> None:
        puts.append(key)
        assert gate.wait(WAIT), "the test never opened the gate"
        put(src, key)

    ctx.store.put_file = gated_put  # type: ignore[method-assign]
    s = _tracked(ctx)
    assert _steps(s, 1) == [False]  # returned while the upload of step 1 is held
    assert s.status()["uploading"] and not gate.is_set()
    assert _steps(s, 1) == [False]  # step 2 is due but waits: one commit in flight
    pending = ctx.checkpoints.pending
    assert pending is not None and pending.step == 1
    gate.set()
    pending.wait(WAIT)
    assert _steps(s, 1) == [False]  # step 3 collects step 1 and starts the deferred save
    assert s.committed_step == 1
    assert ctx.checkpoints.pending is not None and ctx.checkpoints.pending.step == 3
    out = s.close()
    assert out.checkpoint_step == 3 and [c.step for c in ctx.checkpoints.list()] == [1, 3]
    assert {k.rsplit("/", 1)[-1] for k in puts} >= {"model.safetensors", "optimizer.safetensors"}


def test_steps_between_checkpoints_touch_no_storage(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, every_steps=4, policy=StopAfter(None))
    calls: list[str] = []
    for name in ("put_file", "write_bytes", "create", "list", "exists", "read_bytes", "size"):
        original = getattr(ctx.store, name)

        def spy(*a: Any, _name: str = name, _f: Any = original, **k: Any) -> Any:
            calls.append(_name)
            return _f(*a, **k)

        setattr(ctx.store, name, spy)
    s = _tracked(ctx)
    calls.clear()
    _steps(s, 3)
    assert calls == []
    _steps(s, 1)  # step 4: a checkpoint
    s.close()
    assert "create" in calls and s.committed_step == 4
    policy = ctx.policy
    assert isinstance(policy, StopAfter) and policy.checkpoints and policy.checkpoints[0]["n"] > 0


def test_time_interval_checkpoints_come_from_the_policy(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, policy=StopAfter(6, due=frozenset({2, 5})))
    s = _tracked(ctx)
    assert _steps(s, 2) == [False] * 2
    ctx.checkpoints.pending.wait(WAIT)  # type: ignore[union-attr]
    assert _steps(s, 3) == [False] * 3
    ctx.checkpoints.pending.wait(WAIT)  # type: ignore[union-attr]
    assert _steps(s, 1) == [True]
    assert [c.step for c in ctx.checkpoints.list()] == [5, 6]  # keep=2 retained the newest
    assert len(ctx.policy.checkpoints) == 3  # type: ignore[attr-defined]


def test_every_step_time_reaches_the_policy(tmp_path: Path) -> None:
    clock = FakeClock()
    ctx = make_ctx(tmp_path, policy=StopAfter(None), clock=clock)
    s = _tracked(ctx)  # at t=0: without batches(), step times count from track()
    for dt in [0.03, 0.05, 0.01, 0.02, 0.5, 0.04, 0.05]:  # seconds per step
        clock.advance(dt)
        s.step(loss=1.0)
    # one call per optimizer step, boundary to boundary (the StopPolicy contract)
    expected = [0.03, 0.05, 0.01, 0.02, 0.5, 0.04, 0.05]
    assert ctx.policy.observed == pytest.approx(expected)  # type: ignore[attr-defined]


def test_a_failed_background_commit_is_retried(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, every_steps=2)
    put, failures = ctx.store.put_file, [1]

    def flaky_put(src: Any, key: str) -> None:
        if failures:
            failures.pop()
            raise CheckpointError("injected upload failure")
        put(src, key)

    ctx.store.put_file = flaky_put  # type: ignore[method-assign]
    logs: list[str] = []
    ctx = dataclasses.replace(ctx, log=logs.append)
    s = _tracked(ctx)
    _steps(s, 2)
    with pytest.raises(CheckpointError):
        ctx.checkpoints.pending.wait(WAIT)  # type: ignore[union-attr]
    _steps(s, 1)  # step 3: the failure is collected; a checkpoint is due again
    assert any("failed (injected upload failure)" in m for m in logs)
    ctx.checkpoints.pending.wait(WAIT)  # type: ignore[union-attr]
    assert [c.step for c in ctx.checkpoints.list()] == [3]


def test_a_fenced_out_commit_stops_the_loop(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, every_steps=1, epoch=1, fence=lambda: 2)
    s = _tracked(ctx)
    _steps(s, 1)
    with pytest.raises(StaleEpochError):
        ctx.checkpoints.pending.wait(WAIT)  # type: ignore[union-attr]
    with pytest.raises(StaleEpochError, match="epoch 1"):
        _steps(s, 1)
    assert ctx.checkpoints.list() == []


def test_preemption_leaves_optional_objects_out(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    ctx = make_ctx(tmp_path, policy=StopAfter(2, "preemption"))
    s = _tracked(ctx, optional={"sampler_rng": GeneratorState(gen)})
    assert _steps(s, 2) == [False, True]
    assert s.close() == SegmentOutcome(
        stop_reason="preemption", first_step=0, last_step=2, completed=False, checkpoint_step=2
    )
    info = ctx.checkpoints.latest()
    assert info is not None and info.manifest["meta"]["emergency"] is True

    logs: list[str] = []
    fresh = torch.Generator().manual_seed(99)
    ctx2 = make_ctx(tmp_path, policy=StopAfter(3), log=logs.append)
    s2 = _tracked(ctx2, optional={"sampler_rng": GeneratorState(fresh)})
    assert s2.global_step == 2 and any("holds no 'sampler_rng'" in m for m in logs)
    assert _steps(s2, 1) == [True]  # a budget stop: the optional object is saved again
    latest = ctx2.checkpoints.latest()
    assert latest is not None and latest.manifest["meta"]["emergency"] is False


def test_loop_end_without_a_stop_completes_the_job(tmp_path: Path) -> None:
    objs = build("plain", init_seed=0, total=TOTAL)
    with Session(make_ctx(tmp_path)) as s:
        objs.track(s)
        for batch in s.batches(epochs=2):
            loss = objs.model(batch["x"]).sum()
            loss.backward()
            s.step(loss=loss)  # a tensor: summed on its device, no sync
    out = s.outcome
    assert out is not None and out.completed and out.last_step == 12  # 2 epochs of 6 batches
    assert s.epoch == 2 and s.metrics[-1]["step"] == 12
    assert isinstance(s.metrics[-1]["loss"], float)

    again = build("plain", init_seed=1, total=TOTAL)
    with Session(make_ctx(tmp_path)) as s2:
        again.track(s2)
        assert list(s2.batches(epochs=2)) == []
    assert s2.outcome is not None and s2.outcome.last_step == 12
    assert_same_model(objs.model, again.model)


def test_an_error_is_a_crash_without_a_new_checkpoint(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, every_steps=2)
    with pytest.raises(RuntimeError, match="boom"), Session(ctx) as s:
        s.track(model=TinyNet(), batch_size=4)
        _steps(s, 3)
        raise RuntimeError("boom")
    out = s.outcome
    assert out is not None and out.stop_reason == "crash" and "boom" in (out.error or "")
    assert out.checkpoint_step == 2 and out.last_step == 3  # step 2's commit was completed


def test_track_twice_and_mid_window_save_are_refused(tmp_path: Path) -> None:
    s = _tracked(make_ctx(tmp_path), grad_accum=2)
    with pytest.raises(ConfigError, match="already"):
        s.track(model=TinyNet())
    assert not s.optimizer_step_due
    s.step(loss=1.0)
    assert s.optimizer_step_due  # the next micro-batch completes the window
    with pytest.raises(CheckpointError, match="micro-batch 1 of 2"):
        s.save(final=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s.step(loss=1.0) is False and s.global_step == 1
