"""The job state machine: every (state, event) pair, legal or not."""

from __future__ import annotations

import itertools

import pytest

from colabjob.errors import InvalidTransitionError, JobStateError
from colabjob.jobs.policy import StopReason
from colabjob.runner.states import (
    TRANSITIONS,
    JobEvent,
    JobState,
    allowed_events,
    is_terminal,
    transition,
)

S, E = JobState, JobEvent

# Written out independently of the module's table: the spec, not a copy of the code.
LEGAL = {
    (S.CREATED, E.START): S.RUNNING,
    (S.CREATED, E.CANCEL): S.CANCELLED,
    (S.RUNNING, E.SUSPEND): S.SUSPENDED,
    (S.RUNNING, E.EXPIRE): S.SUSPENDED,
    (S.RUNNING, E.COMPLETE): S.COMPLETED,
    (S.RUNNING, E.FAIL): S.FAILED,
    (S.RUNNING, E.CANCEL): S.CANCELLED,
    (S.SUSPENDED, E.RESUME): S.RUNNING,
    (S.SUSPENDED, E.CANCEL): S.CANCELLED,
    (S.FAILED, E.RESUME): S.RUNNING,
    (S.FAILED, E.CANCEL): S.CANCELLED,
    (S.COMPLETED, E.EXTEND): S.SUSPENDED,  # a larger max_steps continues a completed job
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(JobState, JobEvent)))
def test_every_pair(state: JobState, event: JobEvent) -> None:
    if (state, event) in LEGAL:
        assert transition(state, event) is LEGAL[(state, event)]
    else:
        with pytest.raises(InvalidTransitionError) as info:
            transition(state, event)
        assert isinstance(info.value, JobStateError)
        assert state.value in str(info.value) and event.value in str(info.value)
        assert info.value.hint and "allowed from" in info.value.hint


def test_table_is_the_spec() -> None:
    assert dict(TRANSITIONS) == LEGAL


def test_terminal_states_accept_nothing() -> None:
    for state in JobState:
        assert is_terminal(state) == (allowed_events(state) in ([], [E.EXTEND]))
    assert {s for s in JobState if is_terminal(s)} == {S.COMPLETED, S.CANCELLED}
    with pytest.raises(InvalidTransitionError) as info:
        transition(S.CANCELLED, E.RESUME)
    assert "nothing (terminal)" in str(info.value)
    with pytest.raises(InvalidTransitionError) as info:
        transition(S.COMPLETED, E.RESUME)
    assert "allowed from completed: extend" in str(info.value)


def test_values_round_trip_from_strings() -> None:
    assert transition("suspended", "resume") is S.RUNNING  # type: ignore[arg-type]
    assert str(StopReason.STOP_REQUEST) == "stop_request"
    with pytest.raises(InvalidTransitionError):
        transition("bogus", E.START)  # type: ignore[arg-type]
