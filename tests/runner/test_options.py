"""``SegmentOptions`` is the one place each option's default lives: ``colabjob.session()`` and
``colabjob.hf.resumable()`` take every option as a field, with the field's default and type,
and the defaults of what a job spec also sets are the spec's."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from colabjob.config import DEFAULT_MARGIN, JobSpec
from colabjob.config.loader import spec_from_text
from colabjob.hf import resumable
from colabjob.runner.options import DEFAULTS, SegmentOptions, print_event, with_spec_defaults
from colabjob.runner.segment import session

#: Each function's parameters that are not segment options (documented in its docstring).
NOT_OPTIONS: dict[Callable[..., Any], set[str]] = {
    session: {"url", "config"},
    resumable: {"trainer", "url", "exit_on_pause"},
}
FIELDS = {f.name: f for f in dataclasses.fields(SegmentOptions)}


@pytest.mark.parametrize("fn", list(NOT_OPTIONS), ids=lambda fn: fn.__name__)
def test_every_parameter_is_a_field_with_its_default_and_type(fn: Callable[..., Any]) -> None:
    params = inspect.signature(fn).parameters
    options = {name: p for name, p in params.items() if name not in NOT_OPTIONS[fn]}
    assert NOT_OPTIONS[fn] <= set(params)  # the exclusions name real parameters
    assert len(options) >= 15
    for name, param in options.items():
        assert name in FIELDS, f"{fn.__name__}({name}=) is not a SegmentOptions field"
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, name
        default = getattr(DEFAULTS, name)
        assert param.default is default or param.default == default, (
            f"{fn.__name__}({name}={param.default!r}) but the field's default is {default!r}"
        )
        assert param.annotation == FIELDS[name].type, name  # both strings (annotations)


def test_the_options_are_built_from_the_arguments_as_given() -> None:
    got = SegmentOptions.from_arguments(
        {"url": "x", "keep": 5, "every_minutes": None}, besides=("url",), log_metrics=False
    )
    assert (got.keep, got.every_minutes, got.log_metrics) == (5, None, False)
    assert got == dataclasses.replace(DEFAULTS, keep=5, every_minutes=None, log_metrics=False)
    with pytest.raises(TypeError, match="not SegmentOptions fields: kep"):
        SegmentOptions.from_arguments({"kep": 5})


def test_the_library_defaults_are_the_job_specs() -> None:
    spec = JobSpec.from_dict({"job": {"name": "d", "kind": "python", "entrypoint": "t:main"}})
    filled = with_spec_defaults(DEFAULTS, spec)
    # a spec at its defaults changes nothing but the margin (None: DEFAULT_MARGIN)
    assert filled == dataclasses.replace(DEFAULTS, margin=DEFAULT_MARGIN)
    assert DEFAULTS.log is print_event
    assert (DEFAULTS.every_minutes, DEFAULTS.keep, DEFAULTS.log_every_steps) == (30.0, 2, 10)
    assert (DEFAULTS.tensorboard, DEFAULTS.wandb, DEFAULTS.async_checkpoint) == (
        "auto",
        False,
        "auto",
    )


def test_a_spec_fills_what_the_caller_left_at_its_default() -> None:
    spec = spec_from_text(
        """
job: {name: s, kind: python, entrypoint: "t:main"}
training: {max_steps: 7, log_every_steps: 3}
checkpoint: {every_minutes: null, keep: 4, async: false}
budget: {platform: local, margin: 2m}
logging: {tensorboard: false}
"""
    )
    got = with_spec_defaults(SegmentOptions(keep=6, margin="1m", log=None), spec)
    assert (got.keep, got.margin, got.log) == (6, "1m", None)  # the caller's (a CLI flag)
    assert (got.max_steps, got.log_every_steps, got.every_minutes) == (7, 3, None)
    assert (got.platform, got.async_checkpoint, got.tensorboard) == ("local", False, False)
