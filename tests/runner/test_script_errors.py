"""A usage error met by a script (``colabjob.session()``): one line on stderr and exit 2, like
the CLI, with hints naming keyword arguments rather than CLI flags; raised in a notebook."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import colabjob
from colabjob.errors import GeometryChangedError, LeaseHeldError
from colabjob.runner.script_errors import reported_for_script, script_hint
from colabjob.storage import open_store
from tests.cli.builders import hold_lease
from tests.jobs.helpers import train_tiny


def test_a_held_lease_in_a_script_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = tmp_path / "job"
    hold_lease(open_store(str(url)), step=7)
    with (
        pytest.raises(SystemExit) as e,
        colabjob.session(str(url), platform="local", log=None, tensorboard=False) as s,
    ):
        train_tiny(s)
    assert e.value.code == 2
    err = capsys.readouterr().err
    message, hint = err.splitlines()
    assert message.startswith(f"colabjob: error: job {url} is already running on vm (colab, ")
    assert "expires at" in message and "Traceback" not in err
    assert hint.startswith("  hint: ") and "`force=True`" in hint and "--force" not in hint


def test_in_a_notebook_the_error_is_raised_with_the_keyword_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # an interactive interpreter
    url = tmp_path / "job"
    hold_lease(open_store(str(url)), step=7)
    with (
        pytest.raises(LeaseHeldError) as e,
        colabjob.session(str(url), platform="local", log=None, tensorboard=False) as s,
    ):
        train_tiny(s)
    assert "force=True" in (e.value.hint or "") and "--force" not in (e.value.hint or "")


def test_geometry_hint_names_the_keyword_argument(capsys: pytest.CaptureFixture[str]) -> None:
    error = GeometryChangedError(
        "batch_size changed", hint="restore it, or pass --allow-geometry-change to continue"
    )
    with pytest.raises(SystemExit) as e, reported_for_script(exit_on_error=True):
        raise error
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pass allow_geometry_change=True to continue" in err and "--allow" not in err


def test_script_hint_keeps_other_flags_and_commands() -> None:
    assert script_hint("run `colabjob stop J` or pass --force-config") == (
        "run `colabjob stop J` or pass --force-config"
    )
    assert script_hint("pass --force to take over") == "pass force=True to take over"
    assert script_hint(None) is None


def test_errors_that_are_not_usage_errors_pass_through() -> None:
    with pytest.raises(RuntimeError), reported_for_script(exit_on_error=True):
        raise RuntimeError("boom")
