"""A corrupt checkpoint met by a script's ``colabjob.session()`` is reported once.

The store logs the quarantine (what the CLI and a script's stderr show) and, for direct
``CheckpointStore`` callers, also warns; on a training path that warning would print the
same news a second time as a raw ``warnings`` line, so the training path takes the log line
only.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

import colabjob
from colabjob.storage import open_store
from colabjob.storage.catalog import CorruptCheckpointWarning
from colabjob.storage.checkpoints import CheckpointStore
from tests.fakes import FakeClock
from tests.jobs.helpers import train_tiny


def _session(job: Path, clock: FakeClock, lines: list[str]) -> Any:
    return colabjob.session(
        str(job), platform="local", session_started_at=clock.time(), every_steps=4,
        every_minutes=None, max_steps=40, budget="15m", margin=60, clock=clock,
        tensorboard=False, log=lines.append,
    )  # fmt: skip


def test_a_corrupt_checkpoint_is_reported_once_and_the_previous_one_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job, clock, lines = tmp_path / "job", FakeClock(), list[str]()
    with _session(job, clock, lines) as s:  # stops on its budget after a few checkpoints
        train_tiny(s, clock=clock, step_seconds=60)
    checkpoints = CheckpointStore(open_store(str(job)))
    newest, previous = checkpoints.list()[-1], checkpoints.list()[-2]
    victim = job / newest.prefix / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit: same size, another sha256
    victim.write_bytes(bytes(data))

    clock2 = FakeClock()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with _session(job, clock2, lines) as s:
            first: list[int] = []
            train_tiny(s, clock=clock2, after=lambda s: first.append(s.counters.step))
    assert first[0] == previous.step  # fell back to the previous one, in this segment
    assert not [w for w in caught if issubclass(w.category, CorruptCheckpointWarning)]
    reports = [r for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(reports) == 1 and newest.dirname in reports[0].getMessage()
    assert (job / "quarantine" / newest.dirname).is_dir()
