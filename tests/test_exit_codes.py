"""One set of exit codes (``colabjob.errors.ExitCode``): the documented values, carried by
every error class, and the startup script's pause code rendered from the enum."""

from __future__ import annotations

import inspect

import colabjob.errors as errors
from colabjob.errors import ColabJobError, ExitCode
from colabjob.runner.handoff.startup_script import render_startup_script


def test_exit_codes_are_the_documented_ones() -> None:
    assert {c.name: int(c) for c in ExitCode} == {"DONE": 0, "FAILED": 1, "USAGE": 2, "PAUSED": 75}


def test_every_error_carries_an_exit_code_member() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, ColabJobError)
    ]
    assert len(classes) > 20  # the whole tree, not an empty module
    wrong = {c.__name__: c.exit_code for c in classes if not isinstance(c.exit_code, ExitCode)}
    assert not wrong, wrong
    assert {c.exit_code for c in classes} == {ExitCode.FAILED, ExitCode.USAGE}


def test_the_startup_script_pauses_with_the_enum_code() -> None:
    script = render_startup_script(
        job_url="gs://b/job", version="1.0", gpu=False, instance="vm", zone="z", project="p"
    )
    assert f"\nEX_PAUSED={ExitCode.PAUSED.value}\n" in script
    assert script.count("EX_PAUSED=") == 1  # defined once, from the enum
    assert f"exit {ExitCode.PAUSED.value} (paused) after a spot preemption" in script
