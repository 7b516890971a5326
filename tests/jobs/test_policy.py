"""The one stop-policy base class and the one stop-reason enum (``colabjob.jobs.policy``).

What is checked: a subclass that overrides nothing never stops, never asks for a checkpoint,
reports no status and is not an emergency, and a real ``Session`` driven by it trains to the
end of its data and completes; ``AnyOf`` refuses an object that is not a ``StopPolicy`` and
``SegmentContext`` refuses one with a hint; every ``StopReason`` survives a
``SegmentOutcome`` (also from its JSON string value) and an unknown one is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from colabjob.errors import ConfigError
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.policy import AnyOf, StopPolicy, StopReason
from colabjob.jobs.session import Session
from colabjob.storage import open_store
from colabjob.storage.checkpoints import CheckpointStore

from .equiv_child import build


class Bare(StopPolicy):
    """Overrides nothing."""


def test_a_policy_overriding_nothing_never_stops() -> None:
    p = Bare()
    p.observe_step(1.0)
    p.observe_checkpoint(write_seconds=1.0, upload_seconds=2.0, nbytes=3)
    p.expect_checkpoint(10)
    assert p.should_stop() is None and p.checkpoint_due() is False
    assert p.emergency is False and p.status() == {}
    combo = p | Bare()
    assert isinstance(combo, AnyOf) and len(combo.policies) == 2
    assert combo.should_stop() is None and not combo.checkpoint_due() and not combo.emergency


def test_a_session_under_a_bare_policy_runs_to_the_end(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    ctx = SegmentContext(store=store, checkpoints=CheckpointStore(store), policy=Bare())
    objs = build("plain", init_seed=0, total=12)
    with Session(ctx) as s:
        objs.track(s)
        for batch in s.batches(epochs=2):
            loss = objs.model(batch["x"]).sum()
            loss.backward()
            s.step(loss=loss)
    out = s.outcome
    assert out is not None and out.completed and out.stop_reason is StopReason.COMPLETED
    assert out.last_step == out.checkpoint_step == 12  # 2 epochs of 6 batches, final commit


class DuckTyped:
    """Has the methods but is not a StopPolicy: refused where it enters, not probed later."""

    def should_stop(self) -> None:
        return None


def test_an_object_that_is_not_a_stop_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not a StopPolicy"):
        AnyOf(Bare(), DuckTyped())  # type: ignore[arg-type]
    store = open_store(tmp_path)
    with pytest.raises(ConfigError) as info:
        SegmentContext(store=store, checkpoints=CheckpointStore(store), policy=DuckTyped())  # type: ignore[arg-type]
    assert "StopPolicy" in str(info.value.hint)


@pytest.mark.parametrize("reason", list(StopReason))
def test_every_stop_reason_survives_an_outcome(reason: StopReason) -> None:
    done = reason is StopReason.COMPLETED
    for given in (reason, reason.value):  # the enum, or its string read back from JSON
        out = SegmentOutcome(
            stop_reason=given, first_step=0, last_step=1, completed=done, checkpoint_step=1
        )
        assert out.stop_reason is reason and str(out.stop_reason) == reason.value


def test_an_unknown_stop_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown stop reason 'tired'"):
        SegmentOutcome(
            stop_reason="tired",  # type: ignore[arg-type]
            first_step=0,
            last_step=0,
            completed=False,
            checkpoint_step=None,
        )
