"""The typed-field machinery under the job spec: one base class, ``Section``, that turns
loosely typed YAML values into checked, frozen dataclass fields, and the helpers its errors
use. Every field is coerced from its type hint (``int``, ``float``, ``bool``, ``str``,
``Literal``, ``X | None``, ``tuple[str, ...]``, ``dict[str, Any]``, nested sections), so
a spec built in Python and one loaded from YAML pass the same checks. Errors are
``ConfigError`` naming the dotted path of the key, with a "did you mean" hint from difflib,
from the sibling keys, from names other tools use (HF Trainer, axolotl, torchtune), or
from keys that belong in another section.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, NoReturn, TypeVar, Union, get_args, get_origin

from colabjob.errors import ConfigError

S = TypeVar("S", bound="Section")

# Keys users bring from HF Trainer, axolotl or torchtune, and where colabjob keeps them.
ALIASES: dict[str, str] = {
    "base_model": "model.name_or_path",
    "model_name": "model.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "tokenizer_name": "tokenizer.name_or_path",
    "dataset": "data.source",
    "datasets": "data.source",
    "path": "data.source",
    "dataset_name": "data.source",
    "sequence_len": "data.seq_len",
    "max_seq_len": "data.seq_len",
    "max_seq_length": "data.seq_len",
    "block_size": "data.seq_len",
    "sample_packing": "data.packing",
    "dataset_text_field": "data.text_field",
    "learning_rate": "training.lr",
    "micro_batch_size": "training.batch_size",
    "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "num_epochs": "training.epochs",
    "num_train_epochs": "training.epochs",
    "lr_scheduler": "training.scheduler",
    "lr_scheduler_type": "training.scheduler",
    "warmup": "training.warmup_steps",
    "auto_find_batch_size": "training.auto_batch_size",
    "dataloader_num_workers": "training.num_workers",
    "mixed_precision": "training.precision",
    "fp16": "training.precision",
    "bf16": "training.precision",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "lora_r": "lora.r",
    "rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep",
    "output_dir": "job.storage",
    "time_limit": "budget.limit",
}


def suggest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word``, or None when nothing is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def fields_of(section: type[Section] | Section) -> tuple[dataclasses.Field[Any], ...]:
    """``dataclasses.fields`` of a section class or instance (typed for mypy)."""
    return dataclasses.fields(section)  # type: ignore[arg-type]


def unknown_key_error(
    key: object, path: str, section: type[Section], *, where: str = ""
) -> ConfigError:
    """A ConfigError for ``key`` not being a field of ``section`` (found at ``path``)."""
    names = [f.name for f in fields_of(section)]
    dotted = f"{path}.{key}" if path else str(key)
    msg = f"{where}{dotted}: unknown key"
    if not isinstance(key, str):
        return ConfigError(
            f"{where}{dotted}: keys must be strings", hint=f"valid keys: {', '.join(names)}"
        )
    elsewhere = {
        f"{cls._path}.{f.name}": f.name for cls in Section.registry for f in fields_of(cls)
    }
    exact = [p for p, leaf in elsewhere.items() if leaf == key and p != dotted]
    close = suggest(key, names)
    if exact:
        hint = "did you mean " + " or ".join(f"'{p}'" for p in exact) + "?"
    elif close is not None:
        hint = f"did you mean '{_join(path, close)}'?"
    elif key in ALIASES:
        hint = f"colabjob calls this '{ALIASES[key]}'"
    elif (close_leaf := suggest(key, set(elsewhere.values()))) is not None:
        hint = (
            "did you mean "
            + " or ".join(f"'{p}'" for p, leaf in elsewhere.items() if leaf == close_leaf)
            + "?"
        )
    else:
        hint = f"valid keys{' under ' + path if path else ''}: {', '.join(names)}"
    return ConfigError(msg, hint=hint)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ---- durations and timestamps (kept as text in the spec; checked here) ----------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([dhms])")
_CLOCK = re.compile(r"(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?")  # [D-]H:MM[:SS]
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"11h30m"``, ``"90m"``, ``"1.5h"``, ``"45s"``, ``"1d 2h"`` or ``"11:30:00"``.

    The grammar of ``colabjob.runner.platforms.parse_duration`` (a test keeps the two in
    step), copied so a spec is checked without importing the runner. Text needs a unit:
    YAML numbers become ``"<n>s"`` before they get here. Raises ValueError."""
    s = text.strip().lower().replace(" ", "")
    clock = _CLOCK.fullmatch(s)
    if clock:
        d, h, m, sec = (int(g) if g else 0 for g in clock.groups())
        return d * 86400.0 + h * 3600.0 + m * 60.0 + sec
    parts = _DURATION.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def duration_text(value: Any) -> Any:
    """Pre-coercion for duration fields: a YAML number of seconds becomes ``"<n>s"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        number = f"{value:f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
        return f"{number}s"
    return value


def iso_text(value: Any) -> Any:
    """Pre-coercion for timestamps: YAML turns ``2024-05-01T10:00:00Z`` into a datetime."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def parse_iso(text: str) -> dt.datetime:
    """``datetime.fromisoformat`` that also takes a trailing ``Z`` (Python 3.10)."""
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    return dt.datetime.fromisoformat(s)


# ---- coercion from type hints ----------------------------------------------------------------


class _Mismatch(Exception):
    """A value does not fit a type; turned into a ConfigError where the path is known."""

    def __init__(self, expected: str, suggestion: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.suggestion = suggestion


_SCALARS: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def section_of(tp: Any) -> type[Section] | None:
    """The Section class inside ``tp`` (``X`` or ``X | None``), else None."""
    for arg in get_args(tp) if _is_union(tp) else (tp,):
        if isinstance(arg, type) and issubclass(arg, Section):
            return arg
    return None


def is_free_mapping(tp: Any) -> bool:
    """Whether ``tp`` is a ``dict[...]`` whose keys the schema does not fix."""
    return any(get_origin(a) is dict for a in (get_args(tp) if _is_union(tp) else (tp,)))


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or raise _Mismatch (ConfigError from nested sections)."""
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        expected, suggestion = [], None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except _Mismatch as m:
                expected.append(m.expected)
                suggestion = suggestion or m.suggestion
        if type(None) in args:
            expected.append("null")
        raise _Mismatch(" or ".join(expected), suggestion)
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        words = [c for c in choices if isinstance(c, str)]
        close = suggest(value, words) if isinstance(value, str) else None
        raise _Mismatch("one of " + ", ".join(repr(c) for c in choices), close)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(_SCALARS[bool])
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(_SCALARS[int])
    if tp is float:
        number: Any = value
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise _Mismatch(_SCALARS[float]) from None
        is_number = isinstance(number, (int, float)) and not isinstance(number, bool)
        if is_number and math.isfinite(number):
            return float(number)
        raise _Mismatch(f"a finite {_SCALARS[float][2:]}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(_SCALARS[str])
    if origin is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise _Mismatch("a list of strings")
    if origin is dict:
        if isinstance(value, Mapping) and _jsonable(value):
            return copy.deepcopy(dict(value))
        raise _Mismatch("a mapping of plain values (strings, numbers, booleans, lists)")
    if isinstance(tp, type) and issubclass(tp, Section):
        return tp.from_mapping(value)
    raise TypeError(f"unsupported field type in the spec schema: {tp!r}")  # a schema bug


# ---- the section base ------------------------------------------------------------------------


class Section:
    """Base of every spec section (a frozen, keyword-only dataclass).

    ``__post_init__`` coerces each field from its type hint, then runs ``_check`` for the
    section's own rules. ``_path`` is where the section sits in the spec (``"tokenizer.train"``);
    ``_shorthand`` names the field a bare string fills (``model: gpt2``); ``_pre`` maps field
    names to pre-coercions (durations written as numbers, YAML timestamps)."""

    _path: ClassVar[str] = ""
    _shorthand: ClassVar[str | None] = None
    _pre: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}
    registry: ClassVar[list[type[Section]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls._path:
            Section.registry.append(cls)

    @classmethod
    def hints(cls) -> dict[str, Any]:
        """Resolved type hints of the fields (cached per class)."""
        if cls not in _HINTS:
            _HINTS[cls] = typing.get_type_hints(cls)
        return _HINTS[cls]

    def __post_init__(self) -> None:
        hints = self.hints()
        for f in fields_of(self):
            value = getattr(self, f.name)
            pre = self._pre.get(f.name)
            if pre is not None:
                value = pre(value)
            try:
                coerced = coerce(value, hints[f.name])
            except _Mismatch as m:
                problem = f"expected {m.expected}, got {value!r}"
                self._fail(f.name, problem, hint=_mismatch_hint(value, m))
            if coerced is not getattr(self, f.name):
                object.__setattr__(self, f.name, coerced)
        self._check()

    def _check(self) -> None:
        """Rules of this section beyond types; raise with ``self._fail``."""

    def _fail(self, name: str, problem: str, *, hint: str | None = None) -> NoReturn:
        raise ConfigError(f"{_join(self._path, name)}: {problem}", hint=hint)

    @classmethod
    def from_mapping(cls: type[S], data: Any) -> S:
        """Build from a mapping (or ``None`` for all defaults, or the shorthand string)."""
        if isinstance(data, cls):
            return data
        if data is None:
            data = {}
        if isinstance(data, str) and cls._shorthand is not None:
            data = {cls._shorthand: data}
        if not isinstance(data, Mapping):
            shorthand = f" or a string ({cls._shorthand})" if cls._shorthand else ""
            raise _Mismatch(f"a mapping of {cls._path} settings{shorthand}")
        fields = {f.name: f for f in fields_of(cls)}
        for key in data:
            if key not in fields:
                raise unknown_key_error(key, cls._path, cls)
        for name, f in fields.items():
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default and name not in data:
                where = (
                    f"add '{name}:' under '{cls._path}:'"
                    if cls._path
                    else f"add a '{name}:' section"
                )
                raise ConfigError(f"{_join(cls._path, name)}: required", hint=where)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists), fields in declaration order."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields_of(self)}


_HINTS: dict[type, dict[str, Any]] = {}
_NUMERIC_TEXT = re.compile(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


def _mismatch_hint(value: Any, m: _Mismatch) -> str | None:
    if m.suggestion:
        return f"did you mean {m.suggestion!r}?"
    if isinstance(value, str):
        if ("integer" in m.expected or "number" in m.expected) and _NUMERIC_TEXT.fullmatch(value):
            return "write the number without quotes"
        if "true or false" in m.expected and value.lower() in ("true", "false"):
            return "write true or false without quotes"
    elif m.expected.startswith("a string") and value is not None:
        return "put the value in quotes"
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
