"""What a Session tells people and the runner while it trains: the counters and metrics
history the loop reads, the status dict pushed to ``ctx.on_status`` (the heartbeat; at most
every ``STATUS_EVERY`` seconds, and after each commit), the metric line or progress row of
each log interval, and its log messages. ``SessionReport`` is the base class that owns this
for ``colabjob.jobs.session.Session``, which sets the attributes declared here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from colabjob.jobs.progress import format_metric_line, progress_row
from colabjob.jobs.state.format import Counters

if TYPE_CHECKING:
    import torch

    from colabjob.jobs.checkpointing.committer import Committer
    from colabjob.jobs.context import SegmentContext, SegmentOutcome
    from colabjob.jobs.policy import StopPolicy, StopReason
    from colabjob.jobs.step_metrics import MetricsLog

log = logging.getLogger("colabjob.jobs.session")  # the Session's logger, as before the split
STATUS_EVERY = 5.0  # seconds between pushes to ctx.on_status


class SessionReport:
    """The reporting half of ``Session``: reads its counters, never changes training state."""

    ctx: SegmentContext
    _policy: StopPolicy
    _mono: Callable[[], float]
    _every: int | None
    _max_steps: int | None
    _committer: Committer
    _metrics: MetricsLog
    _optimizer: torch.optim.Optimizer | None
    _step: int
    _micro: int
    _epoch: int
    _samples: int
    _tokens: int
    _next_status: float
    _stop_reason: StopReason | None
    _outcome: SegmentOutcome | None

    @property
    def global_step(self) -> int:
        """Optimizer steps done in the whole job."""
        return self._step

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def counters(self) -> Counters:
        return Counters(
            step=self._step,
            micro_step=self._micro,
            epoch=self._epoch,
            samples_seen=self._samples,
            tokens_seen=self._tokens,
        )

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The metrics history of the whole job (restored entries first)."""
        return list(self._metrics.history)

    @property
    def committed_step(self) -> int | None:
        """The newest step committed to storage (restored or written by this session)."""
        return self._committer.committed_step

    def status(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "epoch": self._epoch,
            "samples_seen": self._samples,
            "checkpoint_step": self.committed_step,
            "uploading": self._committer.busy,
        }

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop_reason

    @property
    def outcome(self) -> SegmentOutcome | None:
        """Set by ``close()``."""
        return self._outcome

    def _flush_metrics(self) -> None:
        entry: dict[str, Any] = {"step": self._step, "epoch": self._epoch, "samples": self._samples}
        if self._optimizer is not None:
            entry["lr"] = float(self._optimizer.param_groups[0]["lr"])
        entry = self._metrics.close_window(entry)
        progress = self.ctx.progress
        if progress is not None:
            progress.update(
                self._step, self._max_steps, progress_row(entry, self._policy, self._every)
            )
        elif self.ctx.log is not None:
            self.ctx.log(format_metric_line(entry))

    def _on_commit(self, step: int) -> None:
        if self.ctx.on_status is not None:
            self._push_status(self._mono())

    def _push_status(self, now: float) -> None:
        self._next_status = now + STATUS_EVERY
        if self.ctx.on_status is not None:
            self.ctx.on_status(self.status())

    def _say(self, message: str) -> None:
        log.info("%s", message)
        if self.ctx.log is not None:
            self.ctx.log(message)
