"""Predictive stopping: stop *before* the next step would leave no time for the final save.

The rule (tenacity's ``stop_before_delay`` applied to a training session): stop when

    now + next step (p95 of recent step times) + checkpoint write + upload/flush + margin
        >= deadline

Step times are measured: the p95 of recent steps after a warm-up, the warm-up step itself
until then. Before the session's first step nothing is measured and nothing new could be
saved by stopping, so the step guess defaults to 0 (the first step is taken whenever a final
save and the margin still fit) unless a ``step_guess`` says otherwise. The save estimate
scales the slowest recent checkpoint's write and upload times to the expected checkpoint
size; before the first save it is ``save_guess`` when given, else the expected size (told by
the training loop through ``expect_checkpoint``) at guessed throughputs, else a flat 300 s.
Policies are small objects combined with ``|``; each subclasses
``colabjob.jobs.policy.StopPolicy``. Deadlines are converted to the monotonic clock once,
so a wall-clock jump mid-session cannot move them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.config.run_sections import DEFAULT_MARGIN
from colabjob.errors import ConfigError
from colabjob.jobs.policy import StopPolicy, StopReason
from colabjob.runner.platforms import PlatformInfo, format_duration, parse_duration

# DEFAULT_MARGIN (the spec's ``budget.margin`` default, "5m") is defined once, in config.
_DEFAULT_MARGIN_S = parse_duration(DEFAULT_MARGIN, what="margin")
FALLBACK_SAVE_SECONDS = 300.0  # the save guess when neither a size nor a guess is known


class StepTimes:
    """Recent step durations after a warm-up. ``add`` is an append (it runs at every step);
    ``quantile`` sorts the window when it changed; ``upper_bound`` is a cheap figure at
    least as large as any quantile of the window, for deciding that no exact one is needed."""

    def __init__(self, *, warmup: int = 1, window: int = 256) -> None:
        if warmup < 0 or window < 1:
            raise ConfigError(f"need warmup >= 0 and window >= 1, got {warmup} and {window}")
        self.warmup, self.seen = warmup, 0
        self._recent: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []  # the window when last sorted (kept while stale)
        self._stale = False
        self._high = 0.0  # the longest step added since that sort
        self.warmup_max = 0.0

    def add(self, seconds: float) -> None:
        seconds = float(seconds)
        if seconds < 0.0:
            seconds = 0.0
        self.seen += 1
        if self.seen <= self.warmup:
            if seconds > self.warmup_max:
                self.warmup_max = seconds
            return
        self._recent.append(seconds)
        self._stale = True
        if seconds > self._high:
            self._high = seconds

    @property
    def measured(self) -> int:
        return len(self._recent)

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile of the measured steps; None before any."""
        if not self._recent:
            return None
        if self._stale:
            self._sorted, self._stale, self._high = sorted(self._recent), False, 0.0
        ranked = self._sorted
        rank = min(len(ranked), max(1, math.ceil(q * len(ranked))))
        return ranked[rank - 1]

    def upper_bound(self) -> float | None:
        """At least the window's longest step (the window now is part of the one last
        sorted plus the steps added since); None before any."""
        if not self._recent:
            return None
        return max(self._sorted[-1], self._high) if self._sorted else self._high


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One evaluation of the stop rule; all figures in seconds."""

    left: float  # until the deadline
    step: float
    write: float
    upload: float
    margin: float

    @property
    def need(self) -> float:
        return self.step + self.write + self.upload + self.margin

    @property
    def slack(self) -> float:
        """Seconds of training left before the rule fires (<= 0: stop now)."""
        return self.left - self.need

    @property
    def stop(self) -> bool:
        return self.slack <= 0


class StopBeforeDeadline(StopPolicy):
    """Stop (reason ``budget``) once the next step plus a final save would cross the deadline."""

    def __init__(
        self,
        deadline: float | None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        margin: float = _DEFAULT_MARGIN_S,
        default_step_seconds: float = 0.0,
        warmup_steps: int = 1,
        window: int = 256,
        quantile: float = 0.95,
        checkpoint_nbytes: int | None = None,
        default_save_seconds: float | None = None,
        guess_write_bytes_per_second: float = 100e6,
        guess_upload_bytes_per_second: float = 20e6,
        remember_checkpoints: int = 5,
    ) -> None:
        if (
            margin < 0
            or default_step_seconds < 0
            or (default_save_seconds is not None and default_save_seconds < 0)
        ):
            raise ConfigError("margin and default times must not be negative")
        if not 0 < quantile <= 1:
            raise ConfigError(f"quantile must be in (0, 1], got {quantile}")
        self.clock, self.margin, self.quantile = clock, float(margin), quantile
        self.deadline = deadline
        self._deadline_mono = (
            None if deadline is None else clock.monotonic() + (deadline - clock.time())
        )
        self.steps = StepTimes(warmup=warmup_steps, window=window)
        self.observe_step = self.steps.add  # type: ignore[method-assign]  # hot path: no frame
        self.default_step_seconds = default_step_seconds
        self.default_save_seconds = default_save_seconds
        self.guess_write_bps = guess_write_bytes_per_second
        self.guess_upload_bps = guess_upload_bytes_per_second
        self.expected_nbytes = checkpoint_nbytes
        self._saves: deque[tuple[float, float, int]] = deque(maxlen=max(1, remember_checkpoints))
        self._stopped = False

    def expect_checkpoint(self, nbytes: int) -> None:
        """Tell the size of the coming checkpoint before the first one is measured."""
        self.expected_nbytes = int(nbytes)

    def observe_step(self, seconds: float) -> None:  # replaced by steps.add per instance
        self.steps.add(seconds)

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        self._saves.append((max(0.0, write_seconds), max(0.0, upload_seconds), int(nbytes)))
        self.expected_nbytes = int(nbytes)

    @property
    def checkpoints_measured(self) -> int:
        """How many recent checkpoints the save estimate is based on (0: still a guess)."""
        return len(self._saves)

    def step_estimate(self) -> float:
        """Seconds the next step is expected to take: the p95 of the measured steps; during
        the warm-up the slowest warm-up step (usually slower than the rest: allocation,
        compilation); before any step, ``default_step_seconds``."""
        q = self.steps.quantile(self.quantile)
        if q is None:
            return self.steps.warmup_max if self.steps.seen else self.default_step_seconds
        return q

    def save_estimate(self) -> tuple[float, float]:
        """``(write, upload)`` seconds expected for the final checkpoint: the measured saves
        scaled to the expected size; before any, ``default_save_seconds`` when given, else
        the expected size at the guessed throughputs, else ``FALLBACK_SAVE_SECONDS``."""
        size = self.expected_nbytes
        if self._saves:
            write = upload = 0.0
            for w, u, n in self._saves:
                scale = (size / n) if size and n else 1.0
                write, upload = max(write, w * scale), max(upload, u * scale)
            return write, upload
        if self.default_save_seconds is not None:
            return self.default_save_seconds, 0.0
        if size:
            return size / self.guess_write_bps, size / self.guess_upload_bps
        return FALLBACK_SAVE_SECONDS, 0.0

    def predict(self) -> Prediction | None:
        """The stop rule's inputs now; None when there is no deadline."""
        if self._deadline_mono is None:
            return None
        write, upload = self.save_estimate()
        return Prediction(
            left=self._deadline_mono - self.clock.monotonic(),
            step=self.step_estimate(),
            write=write,
            upload=upload,
            margin=self.margin,
        )

    def should_stop(self) -> StopReason | None:
        if not self._stopped and self._deadline_mono is not None:
            bound = self.steps.upper_bound()
            if bound is not None:  # far from the deadline even for the longest step: go on
                write, upload = self.save_estimate()
                left = self._deadline_mono - self.clock.monotonic()
                if left - (bound + write + upload + self.margin) > 0:
                    return None
            p = self.predict()
            self._stopped = p is not None and p.stop
        return StopReason.BUDGET if self._stopped else None

    def status(self) -> dict[str, Any]:
        p = self.predict()
        if p is None:
            return {"deadline": None}
        now = self.clock.time()
        return {
            "deadline": now + p.left,
            "stop_at": now + p.slack,
            "step_seconds": p.step,
            "save_seconds": p.write + p.upload,
            "margin": p.margin,
        }


class CheckpointEvery(StopPolicy):
    """A checkpoint is due every ``seconds`` (from the start or the last checkpoint)."""

    def __init__(self, seconds: float, *, clock: Clock = SYSTEM_CLOCK) -> None:
        if seconds <= 0:
            raise ConfigError(f"checkpoint interval must be positive, got {seconds}")
        self.every, self.clock = float(seconds), clock
        self._last = clock.monotonic()

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        self._last = self.clock.monotonic()

    def next_in(self) -> float:
        return self._last + self.every - self.clock.monotonic()

    def checkpoint_due(self) -> bool:
        return self.next_in() <= 0

    def status(self) -> dict[str, Any]:
        return {"next_checkpoint_at": self.clock.time() + self.next_in()}


def check_budget_fits(
    limit: float | None, *, margin: float | str, save_guess: float | str | None = None
) -> None:
    """Refuse (``ConfigError``, exit 2) a session length that leaves nothing to train.

    A ``limit`` (the session's length, e.g. ``--budget 20s``) not longer than the margin
    (plus ``save_guess``, when one is given) would stop before the first step with no
    checkpoint. Refused rather than the margin silently shrunk: the margin is what keeps
    the final save inside the session, and the user chose it (or its default)."""
    if limit is None:
        return
    margin_s = parse_duration(margin, what="margin")
    save_s = 0.0 if save_guess is None else parse_duration(save_guess, what="save guess")
    if limit > margin_s + save_s:
        return
    plus = f" plus the {format_duration(save_s)} save guess" if save_s else ""
    suggest = format_duration(max(1.0, round(limit / 10)))
    raise ConfigError(
        f"a budget of {format_duration(limit)} is not longer than the "
        f"{format_duration(margin_s)} margin kept free after the final save{plus}: the run "
        "would stop before its first step with nothing saved",
        hint=f"lower the margin (--margin {suggest}; budget.margin in the spec; margin= in "
        "Python) or give a longer budget",
    )


def budget_for(
    platform: PlatformInfo,
    *,
    clock: Clock = SYSTEM_CLOCK,
    margin: float | str = DEFAULT_MARGIN,
    checkpoint_every: float | str | None = None,
    checkpoint_nbytes: int | None = None,
    step_guess: float | str | None = None,
    save_guess: float | str | None = None,
) -> StopPolicy:
    """The usual policy for a session: stop before ``platform.deadline``, checkpoint every M.

    ``step_guess`` / ``save_guess`` (seconds or a duration such as ``"2m"``; None: the
    defaults, see the module docstring) are what the stop rule assumes before the first
    step / the first checkpoint is measured."""
    policy: StopPolicy = StopBeforeDeadline(
        platform.deadline,
        clock=clock,
        margin=parse_duration(margin, what="margin"),
        checkpoint_nbytes=checkpoint_nbytes,
        default_step_seconds=(
            0.0 if step_guess is None else parse_duration(step_guess, what="step guess")
        ),
        default_save_seconds=(
            None if save_guess is None else parse_duration(save_guess, what="save guess")
        ),
    )
    if checkpoint_every is not None:
        policy = policy | CheckpointEvery(
            parse_duration(checkpoint_every, what="checkpoint interval"), clock=clock
        )
    return policy
