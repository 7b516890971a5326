"""How colabjob shows things to people: live training progress and tables.

``make_progress()`` returns a ``colabjob.jobs.progress.ProgressSink``: on an interactive
terminal a rich progress bar (step/total, loss, samples/s, time left in the session, the
next checkpoint, GPU memory when CUDA is in use); elsewhere — not a TTY, ``NO_COLOR``,
``TERM=dumb``, a ``CI`` variable — one plain line per interval, with no escape codes, so
logs of notebooks, SLURM and CI stay readable. ``print_table`` does the same for
``status``/``ls``. rich is imported only when a rich display is actually built, and torch
never: GPU memory is read only if the training process already imported it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from colabjob.jobs.progress import ProgressSink
from colabjob.runner.platforms import format_duration

_CI_VARS = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "JENKINS_URL", "TF_BUILD")
# Set for `!colabjob ...` inside Colab / Jupyter: a pty, but cursor movement renders badly there.
_NOTEBOOK_VARS = ("COLAB_RELEASE_TAG", "JPY_PARENT_PID", "KAGGLE_KERNEL_RUN_TYPE")


def is_plain(stream: IO[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True when output should be plain text: not a TTY, NO_COLOR, TERM=dumb, a CI run, or a
    shell command of a notebook (Colab, Jupyter, Kaggle)."""
    env = os.environ if environ is None else environ
    stream = sys.stdout if stream is None else stream
    if env.get("COLABJOB_PLAIN"):
        return True
    if "NO_COLOR" in env or env.get("TERM", "") == "dumb":
        return True
    if any(env.get(k) for k in (*_CI_VARS, *_NOTEBOOK_VARS)):
        return True
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def gpu_memory() -> tuple[float, float] | None:
    """(used, total) GiB of CUDA device 0 when this process already uses torch with CUDA."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        used = torch.cuda.memory_reserved(0)
        total = torch.cuda.get_device_properties(0).total_memory
    except Exception:  # a display must never break training
        return None
    return used / 2**30, total / 2**30


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3g}"
    return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:.4g}"


class _Rate:
    """Samples (or steps) per second over the last interval between two updates."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None
        self.value: float | None = None
        self.unit = "steps/s"

    def add(self, now: float, step: int, metrics: Mapping[str, Any]) -> None:
        samples = metrics.get("samples")
        count, self.unit = (
            (float(samples), "samples/s")
            if isinstance(samples, (int, float)) and not isinstance(samples, bool)
            else (float(step), "steps/s")
        )
        if self._last is not None and now > self._last[0] and count >= self._last[1]:
            self.value = (count - self._last[1]) / (now - self._last[0])
        self._last = (now, count)


_SHOWN = ("loss", "lr")
_HIDDEN = {"samples", "deadline", "next_checkpoint_at", "next_checkpoint_step", "step", "time"}


def describe_progress(
    step: int,
    total: int | None,
    metrics: Mapping[str, Any],
    *,
    now: float,
    rate: tuple[float, str] | None = None,
    gpu: tuple[float, float] | None = None,
) -> list[str]:
    """The pieces of one progress line (without step/total), in display order."""
    parts = [f"{k} {_num(metrics[k])}" for k in _SHOWN if k in metrics]
    parts += [
        f"{k} {_num(v)}"
        for k, v in metrics.items()
        if k not in _SHOWN and k not in _HIDDEN and isinstance(v, (int, float, str))
    ]
    if rate is not None:
        parts.append(f"{rate[0]:.3g} {rate[1]}")
    deadline = metrics.get("deadline")
    if isinstance(deadline, (int, float)):
        parts.append(f"session {format_duration(deadline - now)} left")
    nxt = metrics.get("next_checkpoint_at")
    if isinstance(nxt, (int, float)):
        parts.append(f"next ckpt in {format_duration(max(0.0, nxt - now))}")
    elif isinstance(metrics.get("next_checkpoint_step"), int):
        parts.append(f"next ckpt at step {metrics['next_checkpoint_step']}")
    if gpu is not None:
        parts.append(f"gpu {gpu[0]:.1f}/{gpu[1]:.1f} GiB")
    return parts


class PlainProgress:
    """One plain line per ``interval`` seconds (and each event), no escape codes."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.interval, self.clock = float(interval), clock
        self._rate = _Rate()
        self._last_line: float | None = None
        self._pending: tuple[int, int | None, Mapping[str, Any]] | None = None

    def update(self, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        now = self.clock()
        self._rate.add(now, step, metrics)
        if self._last_line is not None and now - self._last_line < self.interval:
            self._pending = (step, total, dict(metrics))
            return
        self._emit(now, step, total, metrics)

    def _emit(self, now: float, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        self._last_line, self._pending = now, None
        rate = (self._rate.value, self._rate.unit) if self._rate.value is not None else None
        head = f"step {step}/{total}" if total else f"step {step}"
        parts = describe_progress(step, total, metrics, now=now, rate=rate, gpu=gpu_memory())
        self._write(" · ".join([head, *parts]))

    def event(self, text: str) -> None:
        self._write(text)

    def close(self) -> None:
        """Print the last step if it was held back by the interval."""
        if self._pending is not None:
            self._emit(self.clock(), *self._pending)

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not stop training
            pass


class RichProgress:
    """A rich progress bar with the same figures as ``PlainProgress`` beside it."""

    def __init__(self, stream: IO[str] | None = None, *, clock: Callable[[], float] = time.time):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.clock = clock
        self.console = Console(file=stream if stream is not None else sys.stdout)
        self.progress = Progress(
            TextColumn("[bold]step"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self._task: Any = None
        self._rate = _Rate()

    def update(self, step: int, total: int | None, metrics: Mapping[str, Any]) -> None:
        try:
            now = self.clock()
            self._rate.add(now, step, metrics)
            rate = (self._rate.value, self._rate.unit) if self._rate.value is not None else None
            info = " · ".join(
                describe_progress(step, total, metrics, now=now, rate=rate, gpu=gpu_memory())
            )
            if self._task is None:
                self.progress.start()
                self._task = self.progress.add_task("train", total=total, info=info)
            self.progress.update(self._task, completed=step, total=total, info=info)
        except Exception:  # a display must never break training
            pass

    def event(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self._task is not None:
            self.progress.stop()


def make_progress(
    mode: str = "auto",
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    interval: float = 10.0,
) -> ProgressSink:
    """``auto`` (rich on an interactive terminal, else plain), ``rich``, ``plain`` or ``none``."""
    from colabjob.jobs.progress import NullProgress

    if mode == "none":
        return NullProgress()
    if mode == "rich" or (mode == "auto" and not is_plain(stream, environ)):
        return RichProgress(stream)
    return PlainProgress(stream, interval=interval)


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    stream: IO[str] | None = None,
    title: str | None = None,
    plain: bool | None = None,
) -> None:
    """A table: rich on a terminal, aligned plain columns otherwise."""
    out = stream if stream is not None else sys.stdout
    if plain is None:
        plain = is_plain(out)
    if not plain:
        from rich import box
        from rich.console import Console
        from rich.table import Table

        table = Table(
            title=title,
            header_style="bold",
            box=box.SIMPLE_HEAD,
            title_justify="left",
            pad_edge=False,
        )
        for h in headers:
            table.add_column(h, no_wrap=True)
        for row in rows:
            table.add_row(*row)
        Console(file=out).print(table)
        return
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [] if title is None else [title]
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    out.write("\n".join(lines) + "\n")


class LogBridge:
    """Feeds a segment's log lines to a ``ProgressSink``: metric lines — the Session's
    (``step=120 epoch=0 samples=960 loss=2.31 lr=0.0006``) and the HF kinds'
    (``step 120: loss=2.31 learning_rate=0.0006``) — become ``update`` calls, with the
    session ``deadline`` added; every other line becomes an ``event``."""

    def __init__(
        self, sink: ProgressSink, *, total: int | None = None, deadline: float | None = None
    ) -> None:
        self.sink, self.total, self.deadline = sink, total, deadline

    def __call__(self, line: str) -> None:
        metrics = parse_metric_line(line)
        if metrics is None:
            self.sink.event(line)
            return
        if self.deadline is not None:
            metrics.setdefault("deadline", self.deadline)
        step = int(metrics.pop("step"))
        self.sink.update(step, self.total, metrics)


_STEP_PREFIX = re.compile(r"^step (\d+): (.*)$")
_RENAME = {"learning_rate": "lr"}
_SUMMARY_KEYS = {"train_runtime", "train_loss", "total_flos"}  # end-of-run summaries


def parse_metric_line(line: str) -> dict[str, Any] | None:
    """The metrics of a log line that is all ``key=value`` (with a step), else None."""
    m = _STEP_PREFIX.match(line.strip())
    head: dict[str, Any] = {"step": int(m.group(1))} if m else {}
    out: dict[str, Any] = dict(head)
    for part in (m.group(2) if m else line).split():
        key, sep, text = part.partition("=")
        if not sep or not key.isidentifier() or key in _SUMMARY_KEYS:
            return None
        try:
            value: Any = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = text
        out[_RENAME.get(key, key)] = value
    if not isinstance(out.get("step"), int) or len(out) < 2:
        return None
    return out
