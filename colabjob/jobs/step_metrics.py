"""The Session's metrics: a running window per optimizer step, and the job's history.

Each micro-batch adds its loss and metrics to a window of running ``[sum, count]`` pairs;
every ``log_every_steps`` optimizer steps the window's means become one history entry
(with the step, epoch, samples seen and learning rate). The history and the open window
travel in every checkpoint, so a resumed job's history is the one an uninterrupted run
would have written: sums continue in float64 either way (tensors are summed on their
device in float64 without a sync, Python floats are float64), bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MetricsLog"]


class MetricsLog:
    """Running window plus history. ``window`` is public for the Session's inlined fast path
    (a float loss added to an existing float sum)."""

    def __init__(self) -> None:
        self.window: dict[str, list[Any]] = {}
        self.steps = 0  # optimizer steps in the open window
        self.history: list[dict[str, Any]] = []

    def add(self, key: str, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().double()
        cur = self.window.get(key)
        if cur is None:
            self.window[key] = [value, 1]
        else:
            cur[0] = cur[0] + value
            cur[1] += 1

    def close_window(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append ``entry`` plus the window's means to the history; start a new window."""
        for key, (total, count) in self.window.items():
            entry[key] = float(total) / count
        self.history.append(entry)
        self.window, self.steps = {}, 0
        return entry

    def state(self) -> dict[str, Any]:
        """The open window, JSON-able (a checkpoint's ``meta``)."""
        return {
            "window": {k: [float(t), n] for k, (t, n) in self.window.items()},
            "window_steps": self.steps,
        }

    def load(self, state: dict[str, Any], history: list[dict[str, Any]]) -> None:
        self.history = list(history)
        self.window = {k: [float(v[0]), int(v[1])] for k, v in state.get("window", {}).items()}
        self.steps = int(state.get("window_steps", 0))
