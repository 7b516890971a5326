"""The runner's segment glue as its callers use it: the budget's guesses in a real session,
the public ``open_segment``, a moved job, an extra stop policy and the progress sink.

Sessions run in-process over memory stores with a fake clock: a training step "takes" the
seconds the test advances the clock by; nothing waits for a deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import pytest
import torch

import colabjob
from colabjob.errors import JobMovedError, JobStateError
from colabjob.jobs.context import SegmentOutcome
from colabjob.jobs.demo import StepBudget
from colabjob.jobs.policy import AnyOf, StopReason
from colabjob.jobs.session import Session
from colabjob.runner.budget import StopBeforeDeadline
from colabjob.runner.handoff.transfer import MovedMarker, mark_moved
from colabjob.runner.lease.info import read_lease
from colabjob.runner.record import create_record, load_record
from colabjob.runner.segment import OpenSegment, SegmentOptions, open_segment
from colabjob.runner.states import JobState
from colabjob.runner.watchdog import Watchdog
from colabjob.storage import open_store
from tests.fakes import FakeClock
from tests.jobs.helpers import train_tiny


@pytest.fixture
def url() -> str:
    return f"memory://open-segment-{uuid.uuid4().hex}"


def _budget(s: Session) -> StopBeforeDeadline:
    """The deadline rule inside the session's watchdog."""
    watchdog = s.ctx.policy
    assert isinstance(watchdog, Watchdog)
    policy = watchdog.policy
    if isinstance(policy, AnyOf):
        policy = next(p for p in policy.policies if isinstance(p, StopBeforeDeadline))
    assert isinstance(policy, StopBeforeDeadline)
    return policy


def _train(s: Session, *, step_seconds: float = 1.0, **kw: Any) -> None:
    train_tiny(s, step_seconds=step_seconds, **kw)


# ---- the budget's guesses in a session ----------------------------------------------------------


def test_a_90s_session_with_1s_steps_trains_until_its_budget(url: str) -> None:
    clock = FakeClock()
    with colabjob.session(
        url, budget=90, session_started_at=clock.time(), platform="local", margin=5,
        every_minutes=None, clock=clock, log=None,
    ) as s:  # fmt: skip
        _train(s, clock=clock)
    out = s.outcome
    assert out is not None and out.stop_reason == "budget"
    # 90 s - 5 s margin - the next 1 s step - a tiny model's guessed save: ~84 steps
    assert 80 <= out.last_step <= 85 and out.checkpoint_step == out.last_step
    assert clock.time() <= load_record(open_store(url)).history[0].started_at + 90 - 5


def test_guesses_given_to_session_are_used_before_measurements(url: str) -> None:
    clock = FakeClock()
    with colabjob.session(
        url, budget=90, session_started_at=clock.time(), platform="local", margin=5,
        step_guess="1m", save_guess=30, every_minutes=None, clock=clock, log=None,
    ) as s:  # fmt: skip
        budget = _budget(s)
        assert budget.step_estimate() == 60 and budget.save_estimate() == (30, 0)
        assert s.ctx.policy.should_stop() == "budget"  # 60 + 30 + 5 > 90: not even step 0
        _train(s, clock=clock)
    assert s.outcome is not None and s.outcome.last_step == 0


def test_the_save_guess_scales_with_the_expected_checkpoint_bytes(url: str) -> None:
    def guesses(width: int) -> tuple[int, int, dict[int, Any]]:
        clock = FakeClock()
        model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Linear(width, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        seen: dict[int, Any] = {}

        def look(s: Session) -> None:  # after each optimizer step, before s.step()
            b = _budget(s)
            seen[s.global_step] = (b.expected_nbytes, b.save_estimate(), b.checkpoints_measured)

        with colabjob.session(
            f"{url}-{width}", budget="1h", session_started_at=clock.time(), platform="local",
            every_minutes=None, max_steps=3, clock=clock, log=None, tensorboard=False,
        ) as s:  # fmt: skip
            _train(s, clock=clock, model=model, opt=opt, after=look)
        state = sum(
            v.numel() * v.element_size()
            for per in opt.state.values()
            for v in per.values()
            if isinstance(v, torch.Tensor)
        )
        return weights, state, seen

    sizes = []
    for width in (16, 256):
        weights, state, seen = guesses(width)
        assert seen[0][0] == 3 * weights  # at track(): weights + two guessed AdamW moments
        nbytes, (write, upload), measured = seen[1]  # after the first step: the exact size
        assert nbytes == weights + state and measured == 0
        assert write == pytest.approx(nbytes / 100e6) and upload == pytest.approx(nbytes / 20e6)
        sizes.append((nbytes, write))
    (small, small_write), (big, big_write) = sizes
    assert big > 10 * small and big_write / small_write == pytest.approx(big / small)


# ---- open_segment, moved jobs, extra policies, progress ------------------------------------------


def test_a_moved_job_raises_and_starts_no_segment(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(url)
    create_record(store, job_id="j", config={})
    mark_moved(store, MovedMarker(moved_to="gs://bucket/jobs/j", moved_at=1_700_000_000.0))
    before = load_record(store)
    with (
        pytest.raises(SystemExit) as info,  # a JobMovedError, reported as the CLI does
        colabjob.session(url, platform="local", log=None),
    ):
        pytest.fail("the body of a moved job's session ran")
    assert info.value.code == JobMovedError.exit_code == 2
    assert "gs://bucket/jobs/j" in capsys.readouterr().err
    assert load_record(store) == before and not before.history
    assert read_lease(store) is None


def test_open_segment_records_the_outcome_it_is_given(url: str) -> None:
    opts = SegmentOptions(platform="local", log=None, clock=FakeClock())
    with open_segment(url, opts, config={"note": "x"}) as seg:
        assert isinstance(seg, OpenSegment) and seg.context.epoch == 1
        seg.outcome = SegmentOutcome(
            stop_reason="budget", first_step=0, last_step=0, completed=False, checkpoint_step=None
        )
    record = load_record(open_store(url))
    assert record.state is JobState.SUSPENDED and record.config == {"note": "x"}
    assert record.history[-1].stop_reason is StopReason.BUDGET

    with pytest.raises(JobStateError, match="without an outcome"), open_segment(url, opts):
        pass
    record = load_record(open_store(url))
    assert record.state is JobState.FAILED and record.history[-1].stop_reason is StopReason.CRASH
    lease = read_lease(open_store(url))
    assert lease is not None and lease[0].released


class Recorder:
    def __init__(self) -> None:
        self.updates: list[tuple[int, int | None, dict[str, Any]]] = []
        self.events: list[str] = []

    def update(self, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        self.updates.append((step, total, dict(metrics)))

    def event(self, text: str) -> None:
        self.events.append(text)


def test_an_extra_stop_policy_and_the_progress_sink(url: str) -> None:
    clock = FakeClock()
    sink = Recorder()
    opts = SegmentOptions(
        platform="local", budget="2h", session_started_at=clock.time(), every_minutes=10,
        every_steps=4, max_steps=100, log_every_steps=2, clock=clock, progress=sink,
        stop_policy=StepBudget(6), tensorboard=False, log=None,  # as the CLI's child
    )  # fmt: skip
    with open_segment(url, opts) as seg, Session(seg.context) as s:
        _train(s, clock=clock, step_seconds=2.0)
        seg.outcome = s.close()
    assert seg.outcome.stop_reason == "budget" and seg.outcome.last_step == 6
    assert [(u[0], u[1]) for u in sink.updates] == [(2, 100), (4, 100), (6, 100)]
    _, _, metrics = sink.updates[0]
    assert {"loss", "lr", "samples", "epoch"} <= metrics.keys() and "step" not in metrics
    started = load_record(open_store(url)).history[-1].started_at
    assert metrics["deadline"] == pytest.approx(started + 7200)  # time left in the session
    assert metrics["next_checkpoint_at"] == pytest.approx(started + 600)  # every 10 min
    assert metrics["next_checkpoint_step"] == 4
    assert any("lease epoch 1" in e for e in sink.events)  # events go to the display too
    assert any("stopping at step 6: budget" in e for e in sink.events)
    assert not any(e.startswith("step=") for e in sink.events)  # metrics are updates


def test_without_a_sink_metrics_are_log_lines(url: str) -> None:
    lines: list[str] = []
    with colabjob.session(
        url, platform="local", max_steps=4, log_every_steps=2, log=lines.append,
        tensorboard=False, clock=FakeClock(),
    ) as s:  # fmt: skip
        _train(s)
    assert [ln.split()[0] for ln in lines if ln.startswith("step=")] == ["step=2", "step=4"]
    assert s.ctx.progress is None
