"""Predictive stopping with a fake clock: stop exactly when the prediction crosses the deadline."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from colabjob.errors import ConfigError
from colabjob.jobs.policy import AnyOf, NeverStop, StopPolicy, StopReason
from colabjob.runner.budget import (
    CheckpointEvery,
    StepTimes,
    StopBeforeDeadline,
    budget_for,
)
from colabjob.runner.platforms import PlatformInfo
from tests.fakes import FakeClock


def test_policies_satisfy_the_protocol() -> None:
    clock = FakeClock()
    for p in (StopBeforeDeadline(None, clock=clock), CheckpointEvery(60, clock=clock), NeverStop()):
        assert isinstance(p, StopPolicy)
    assert isinstance(
        StopBeforeDeadline(None, clock=clock) | CheckpointEvery(1, clock=clock), StopPolicy
    )


def test_stops_exactly_when_the_prediction_crosses() -> None:
    clock = FakeClock()
    start = clock.time()
    policy = StopBeforeDeadline(start + 1000, clock=clock, margin=60, warmup_steps=0)
    policy.observe_checkpoint(write_seconds=20, upload_seconds=20, nbytes=1000)
    decisions: list[tuple[float, str | None]] = []
    while True:
        verdict = policy.should_stop()
        decisions.append((clock.time() - start, verdict))
        if verdict:
            break
        clock.advance(10)
        policy.observe_step(10)
    # need = step 10 + write 20 + upload 20 + margin 60 = 110: first stop at 1000 - 110 = 890
    assert decisions[-1] == (890, "budget")
    assert decisions[-2] == (880, None)
    assert policy.should_stop() == "budget"  # latched
    p = policy.predict()
    assert p is not None and (p.step, p.write, p.upload, p.margin, p.need) == (10, 20, 20, 60, 110)


def test_before_measurements_the_guesses_then_the_warmup_step() -> None:
    clock = FakeClock()
    policy = StopBeforeDeadline(
        clock.time() + 1000,
        clock=clock,
        margin=0,
        default_step_seconds=60,
        default_save_seconds=300,
        warmup_steps=1,
    )
    assert policy.step_estimate() == 60 and policy.save_estimate() == (300, 0)
    policy.observe_step(100)  # the warm-up step (compilation) is slow and not a sample...
    assert policy.step_estimate() == 100  # ...but it is the estimate until samples exist
    policy.observe_step(2)
    assert policy.step_estimate() == 2
    policy.expect_checkpoint(200_000_000)  # an explicit save guess wins over the size...
    assert policy.save_estimate() == (300, 0)
    policy.observe_checkpoint(write_seconds=1, upload_seconds=3, nbytes=100_000_000)
    assert policy.save_estimate() == (1, 3)  # ...until a save is measured
    policy.expect_checkpoint(200_000_000)
    assert policy.save_estimate() == (2, 6)  # scaled to the expected size


def test_the_default_guesses() -> None:
    clock = FakeClock()
    policy = StopBeforeDeadline(clock.time() + 1000, clock=clock, margin=0)
    # before the first step nothing new could be saved: no step is reserved
    assert policy.step_estimate() == 0 and policy.save_estimate() == (300, 0)
    policy.observe_step(0.5)  # the warm-up step is the estimate now, not a flat 60 s
    assert policy.step_estimate() == 0.5
    policy.expect_checkpoint(200_000_000)  # a size before any save: guessed throughputs
    write, upload = policy.save_estimate()
    assert write == pytest.approx(2.0) and upload == pytest.approx(10.0)


def test_budget_for_takes_the_guesses() -> None:
    clock = FakeClock()
    info = PlatformInfo(name="local", tier=None, deadline=clock.time() + 3600, limit=None)
    policy = budget_for(info, clock=clock, step_guess="2m", save_guess=90)
    assert isinstance(policy, StopBeforeDeadline)
    assert policy.step_estimate() == 120 and policy.save_estimate() == (90, 0)
    with pytest.raises(ConfigError):
        budget_for(info, clock=clock, step_guess="soon")


def test_expect_checkpoint_reaches_the_budget_through_any_of_and_other_policies() -> None:
    clock = FakeClock()
    budget = StopBeforeDeadline(clock.time() + 1000, clock=clock, margin=0)
    combo = AnyOf(budget | CheckpointEvery(60, clock=clock), NeverStop())
    combo.expect_checkpoint(40_000_000)
    assert budget.expected_nbytes == 40_000_000
    assert not combo.emergency and combo.should_stop() is None
    assert "deadline" in combo.status()


def test_save_estimate_scales_the_slowest_recent_save() -> None:
    policy = StopBeforeDeadline(None, clock=FakeClock(), remember_checkpoints=2)
    policy.observe_checkpoint(write_seconds=10, upload_seconds=100, nbytes=1_000)
    policy.observe_checkpoint(write_seconds=4, upload_seconds=30, nbytes=500)
    assert policy.save_estimate() == (5.0, 50.0)  # the first, scaled to the newest size
    policy.observe_checkpoint(write_seconds=3, upload_seconds=20, nbytes=500)
    assert policy.save_estimate() == (4.0, 30.0)  # the first save has been forgotten
    assert policy.predict() is None and policy.should_stop() is None


def test_the_cheap_bound_never_changes_a_stop_decision() -> None:
    """should_stop skips the exact p95 while even the longest recent step fits; over random
    step times (spikes included), a sliding window and status reads that sort in between,
    its verdict at every step is the exact rule's, and the bound is never below the p95."""
    rng = random.Random(7)
    for trial in range(20):
        clock = FakeClock()
        deadline = clock.time() + 400
        policy, shadow = (
            StopBeforeDeadline(deadline, clock=clock, margin=10, warmup_steps=1, window=16)
            for _ in range(2)
        )  # the shadow gives the exact rule (predict sorts its window at every step)
        for p in (policy, shadow):
            p.observe_checkpoint(write_seconds=3, upload_seconds=2, nbytes=100)
        while True:
            step = rng.choice([0.5, 1.0, 1.5]) if rng.random() > 0.05 else rng.uniform(5, 30)
            clock.advance(step)
            policy.observe_step(step)
            shadow.observe_step(step)
            if rng.random() < 0.1:
                policy.status()  # sorts the window between steps
            q, bound = shadow.steps.quantile(0.95), policy.steps.upper_bound()
            assert q is None or (bound is not None and bound >= q), trial
            exact = shadow.predict()
            assert exact is not None
            verdict = policy.should_stop()
            assert (verdict == "budget") == exact.stop, (trial, exact)
            if verdict:
                break


def test_p95_nearest_rank_after_warmup() -> None:
    times = StepTimes(warmup=2, window=100)
    for s in [50.0, 40.0] + [1.0] * 95 + [3.0] * 5:
        times.add(s)
    assert times.measured == 100 and times.quantile(0.95) == 1.0
    times.add(3.0)  # window slides: 94 ones, 6 threes
    assert times.quantile(0.95) == 3.0
    assert StepTimes().quantile(0.95) is None
    with pytest.raises(ConfigError):
        StepTimes(window=0)


def test_wall_clock_jump_does_not_move_the_deadline() -> None:
    clock = FakeClock()
    policy = StopBeforeDeadline(
        clock.time() + 500, clock=clock, margin=0, default_save_seconds=0, default_step_seconds=0
    )
    clock.jump_wall(+3600)  # NTP step forward: monotonic time is what counts
    assert policy.should_stop() is None
    clock.advance(499)
    assert policy.should_stop() is None
    clock.advance(1)
    assert policy.should_stop() == "budget"


def test_checkpoint_every() -> None:
    clock = FakeClock()
    every = CheckpointEvery(600, clock=clock)
    assert not every.checkpoint_due()
    clock.advance(599)
    assert not every.checkpoint_due() and every.next_in() == 1
    clock.advance(1)
    assert every.checkpoint_due()
    every.observe_checkpoint(write_seconds=1, upload_seconds=1, nbytes=1)
    assert not every.checkpoint_due()
    assert every.status()["next_checkpoint_at"] == clock.time() + 600
    with pytest.raises(ConfigError):
        CheckpointEvery(0, clock=clock)


def test_any_of_composes_and_flattens() -> None:
    clock = FakeClock()
    calls: list[str] = []

    class Spy(StopPolicy):
        def __init__(self, name: str, verdict: StopReason | None, due: bool) -> None:
            self.name, self.verdict, self.due = name, verdict, due

        def observe_step(self, seconds: float) -> None:
            calls.append(f"{self.name}:{seconds}")

        def should_stop(self) -> StopReason | None:
            return self.verdict

        def checkpoint_due(self) -> bool:
            calls.append(f"{self.name}:due")
            return self.due

    combo = (
        Spy("a", None, True)
        | Spy("b", StopReason.SIGNAL, False)
        | Spy("c", StopReason.BUDGET, False)
    )
    assert isinstance(combo, AnyOf) and len(combo.policies) == 3
    combo.observe_step(1.5)
    assert combo.should_stop() is StopReason.SIGNAL
    assert combo.checkpoint_due()
    assert calls == ["a:1.5", "b:1.5", "c:1.5", "a:due", "b:due", "c:due"]
    assert not combo.emergency
    assert (StopBeforeDeadline(None, clock=clock) | StopPolicy()).status() == {"deadline": None}


def test_budget_for_a_platform() -> None:
    clock = FakeClock()
    info = PlatformInfo(name="colab", tier="free", deadline=clock.time() + 3600, limit=43200.0)
    policy = budget_for(info, clock=clock, margin="2m", checkpoint_every="10m")
    assert isinstance(policy, AnyOf)
    deadline_policy = policy.policies[0]
    assert isinstance(deadline_policy, StopBeforeDeadline) and deadline_policy.margin == 120
    clock.advance(600)
    assert policy.checkpoint_due()
    status = policy.status()
    assert status["deadline"] == pytest.approx(info.deadline)
    assert status["next_checkpoint_at"] == clock.time()


def simulate(
    policy: StopPolicy,
    clock: FakeClock,
    step: Callable[[], float],
    save: Callable[[], tuple[float, float, int]],
) -> tuple[float, int, bool]:
    """A training loop against ``policy``; returns when the final commit finished, the
    steps, and whether a final save was needed.

    Like ``Session``: an interval checkpoint of the step we stop at is the final one.
    """
    steps, saved = 0, 0
    while not policy.should_stop():
        dt = step()
        clock.advance(dt)
        policy.observe_step(dt)
        steps += 1
        if policy.checkpoint_due():
            w, u, n = save()
            clock.advance(w + u)
            policy.observe_checkpoint(write_seconds=w, upload_seconds=u, nbytes=n)
            saved = steps
    if saved != steps:
        w, u, _ = save()
        clock.advance(w + u)
    return clock.time(), steps, saved != steps


def test_never_misses_the_deadline_in_1000_random_sessions() -> None:
    rng = random.Random(1234)
    margin = 120.0
    worst_slack, measured, trained = float("inf"), 0, 0
    for _ in range(1000):
        clock = FakeClock()
        base = rng.uniform(0.2, 20.0)
        nbytes = rng.randint(10**6, 5 * 10**9)
        write_bps, upload_bps = rng.uniform(50e6, 500e6), rng.uniform(10e6, 200e6)
        save_mean = nbytes / write_bps + nbytes / upload_bps

        def step(base: float = base) -> float:
            spike = 1.5 if rng.random() < 0.02 else 1.0
            return base * rng.uniform(0.9, 1.1) * spike

        def save(
            n: int = nbytes, w: float = write_bps, u: float = upload_bps
        ) -> tuple[float, float, int]:
            return n / w * rng.uniform(0.9, 1.1), n / u * rng.uniform(0.9, 1.1), n

        length = base * rng.randint(100, 400) + 4 * save_mean + margin
        deadline = clock.time() + length
        predictor = StopBeforeDeadline(
            deadline,
            clock=clock,
            margin=margin,
            checkpoint_nbytes=nbytes,
            default_step_seconds=30.0,
        )
        policy = predictor | CheckpointEvery(length / 5, clock=clock)
        end, steps, final_save = simulate(policy, clock, step, save)
        assert end <= deadline, (base, nbytes, write_bps, upload_bps, length)
        trained += steps > 0  # (a guessed save longer than the session stops at once)
        # and it does not stop absurdly early: margin + a few steps + estimate error (+ the
        # reserved save itself when an interval checkpoint happened to be the final one)
        # (before any save was measured the guessed throughput may be far too low: no bound)
        unused = 0.5 * save_mean if final_save else 1.5 * save_mean
        if predictor.checkpoints_measured:
            measured += 1
            assert deadline - end <= margin + 4 * base + unused + 1.0
        worst_slack = min(worst_slack, deadline - end)
    assert worst_slack >= 0 and measured > 900 and trained > 950


@pytest.mark.parametrize("step_s", [0.1, 5.0, 60.0])
@pytest.mark.parametrize("write_s", [1.0, 60.0, 600.0])
@pytest.mark.parametrize("upload_s", [0.0, 30.0, 900.0])
def test_final_commit_lands_within_one_step_of_the_margin(
    step_s: float, write_s: float, upload_s: float
) -> None:
    clock = FakeClock()
    margin = 180.0
    deadline = clock.time() + write_s + upload_s + margin + 200.5 * step_s
    policy = StopBeforeDeadline(deadline, clock=clock, margin=margin, warmup_steps=0)
    policy.observe_checkpoint(write_seconds=write_s, upload_seconds=upload_s, nbytes=10**9)
    policy.observe_step(step_s)  # measured in an earlier stretch of this session
    end, _, _ = simulate(policy, clock, lambda: step_s, lambda: (write_s, upload_s, 10**9))
    assert deadline - margin - step_s - 1e-6 <= end <= deadline - margin + 1e-6
