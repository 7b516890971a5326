"""The display: plain lines off a terminal (no escape codes), rich on one, the bridge from
the Session's log lines to progress updates, and tables."""

from __future__ import annotations

import io
from typing import Any

import pytest

from colabjob.display import (
    LogBridge,
    PlainProgress,
    RichProgress,
    describe_progress,
    is_plain,
    make_progress,
    print_table,
)
from colabjob.jobs.progress import NullProgress, ProgressSink


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("env", "tty", "plain"),
    [
        ({}, True, False),
        ({}, False, True),
        ({"NO_COLOR": ""}, True, True),
        ({"TERM": "dumb"}, True, True),
        ({"CI": "true"}, True, True),
        ({"GITHUB_ACTIONS": "true"}, True, True),
        ({"COLAB_RELEASE_TAG": "release-colab-x"}, True, True),  # `!colabjob` in Colab: a pty
        ({"JPY_PARENT_PID": "123"}, True, True),
        ({"TERM": "xterm-256color"}, True, False),
    ],
)
def test_plain_mode_detection(env: dict[str, str], tty: bool, plain: bool) -> None:
    stream = TTY() if tty else io.StringIO()
    assert is_plain(stream, env) is plain
    sink = make_progress(stream=stream, environ=env)
    assert isinstance(sink, PlainProgress if plain else RichProgress)
    assert isinstance(sink, ProgressSink)


def test_plain_progress_prints_one_line_per_interval() -> None:
    now = [100.0]
    out = io.StringIO()
    p = PlainProgress(out, interval=10.0, clock=lambda: now[0])
    for step in range(1, 31):
        p.update(
            step,
            30,
            {"loss": 1.0 / step, "lr": 1e-3, "samples": 8 * step, "deadline": 100.0 + 3600},
        )
        now[0] += 1.0
    p.event("checkpoint step 30 committed")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 1/30 · loss 1 · lr 0.001")
    assert [line.split()[1] for line in lines[:3]] == ["1/30", "11/30", "21/30"]
    assert "8 samples/s" in lines[1] and "session 59m" in lines[1]
    assert lines[-2] == "checkpoint step 30 committed"
    assert lines[-1].startswith("step 30/30")  # held back by the interval, shown on close
    assert "\x1b[" not in out.getvalue()


def test_rich_progress_renders_on_a_terminal() -> None:
    out = TTY()
    p = RichProgress(out)
    p.update(1, 10, {"loss": 2.5})
    p.event("checkpoint step 1 committed")
    p.update(2, 10, {"loss": 2.4})
    p.close()
    text = out.getvalue()
    assert "checkpoint step 1 committed" in text and "loss 2.4" in text


def test_progress_figures() -> None:
    parts = describe_progress(
        5,
        10,
        {"loss": 0.25, "grad_norm": 1.5, "next_checkpoint_at": 160.0, "deadline": 1000.0},
        now=100.0,
        rate=(12.0, "samples/s"),
        gpu=(3.2, 15.0),
    )
    assert parts == [
        "loss 0.25",
        "grad_norm 1.5",
        "12 samples/s",
        "session 15m00s left",
        "next ckpt in 1m00s",
        "gpu 3.2/15.0 GiB",
    ]


class Recorder:
    def __init__(self) -> None:
        self.updates: list[tuple[int, int | None, dict[str, Any]]] = []
        self.events: list[str] = []

    def update(self, step: int, total: int | None, metrics: Any) -> None:
        self.updates.append((step, total, dict(metrics)))

    def event(self, text: str) -> None:
        self.events.append(text)


def test_log_bridge_turns_metric_lines_into_updates() -> None:
    rec = Recorder()
    bridge = LogBridge(rec, total=100, deadline=5000.0)
    bridge("step=20 epoch=0 samples=160 loss=2.31 lr=0.0006")
    bridge("checkpoint step 20 committed (0.1 MB, 0.2 s)")
    bridge("step 22: loss=2.2 grad_norm=0.5 learning_rate=0.0005 epoch=0.1")  # the HF kinds
    bridge("step 22: train_runtime=0.09 train_loss=5.4")
    bridge("stopping at step 22: budget")
    assert rec.updates == [
        (20, 100, {"epoch": 0, "samples": 160, "loss": 2.31, "lr": 0.0006, "deadline": 5000.0}),
        (22, 100, {"loss": 2.2, "grad_norm": 0.5, "lr": 0.0005, "epoch": 0.1, "deadline": 5000.0}),
    ]
    assert rec.events == [
        "checkpoint step 20 committed (0.1 MB, 0.2 s)",
        "step 22: train_runtime=0.09 train_loss=5.4",
        "stopping at step 22: budget",
    ]


def test_null_progress_accepts_everything() -> None:
    sink = NullProgress()
    sink.update(1, None, {})
    sink.event("x")
    assert isinstance(sink, ProgressSink)


def test_plain_table_is_aligned() -> None:
    out = io.StringIO()
    print_table(["A", "LONGER"], [["xyz", "1"], ["q", "22"]], stream=out, plain=True)
    assert out.getvalue().splitlines() == ["A    LONGER", "xyz  1", "q    22"]
