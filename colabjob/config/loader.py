"""Reading job specs: YAML text (duplicate keys refused) plus ``--set key.sub=value``
overrides (values parsed as YAML scalars, paths checked against the schema) into a
validated ``JobSpec``. Errors carry the file name and the dotted key. Also the pre-flight
check that local paths a spec names exist, which the CLI runs before writing anything.
"""

from __future__ import annotations

import copy
import glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from colabjob.config._fields import (
    Section,
    fields_of,
    is_free_mapping,
    section_of,
    unknown_key_error,
)
from colabjob.config.jobspec import JobSpec
from colabjob.config.schema import looks_local
from colabjob.errors import ConfigError

# Setting one of these with --set drops the other unless it is set too.
_EXCLUSIVE: tuple[tuple[str, str], ...] = (("training.max_steps", "training.epochs"),)
# A spec is a few levels deep; far deeper nesting is a broken or hostile file, and copying,
# validating or hashing it would recurse past Python's stack limit.
MAX_DEPTH = 64


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping_without_duplicates(
    loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False
) -> Any:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key; the schema check reports it
            continue
        if duplicate:
            raise ConfigError(
                f"line {key_node.start_mark.line + 1}: key {key!r} appears twice",
                hint="keep one of them",
            )
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def _too_deep(what: str) -> ConfigError:
    # one line, no hint: the message says what to do
    return ConfigError(f"{what} nests more than {MAX_DEPTH} levels deep; flatten it")


def _depth_at_most(data: Any, limit: int) -> bool:
    """Whether lists and mappings in ``data`` nest at most ``limit`` levels (no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > limit:
            return False
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)
    return True


def _load_yaml(text: str, loader: type[yaml.SafeLoader], what: str) -> Any:
    """``text`` parsed with ``loader``; too deep a nesting is a ``ConfigError``. PyYAML
    composes nodes recursively, so a few thousand ``[`` exhaust the stack before any
    check of ours could run on the result."""
    try:
        data = yaml.load(text, Loader=loader)
    except RecursionError:
        raise _too_deep(what) from None
    if not _depth_at_most(data, MAX_DEPTH):
        raise _too_deep(what)
    return data


def parse_yaml(text: str) -> dict[str, Any]:
    """The top-level mapping of a YAML job spec (empty text: an empty mapping)."""
    try:
        data = _load_yaml(text, _StrictLoader, "the spec")
    except yaml.YAMLError as e:
        raise ConfigError(
            f"not valid YAML: {e}", hint="check the indentation and quoting near that line"
        ) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"a job spec must be a mapping of sections, got {type(data).__name__}",
            hint="start from `colabjob init`",
        )
    return data


def _parse_value(text: str) -> Any:
    try:
        return _load_yaml(text, yaml.SafeLoader, "a --set value")
    except yaml.YAMLError:
        return text


def _check_path(parts: list[str], item: str) -> type[Section] | None:
    """Check a dotted --set path against the schema; the section owning the last key."""
    section: type[Section] = JobSpec
    for i, part in enumerate(parts):
        where = f"--set {item}: "
        names = {f.name for f in fields_of(section)}
        if part not in names:
            raise unknown_key_error(part, ".".join(parts[:i]), section, where=where)
        tp = section.hints()[part]
        if i == len(parts) - 1:
            return section
        if is_free_mapping(tp):
            return None  # model.config.n_layer, job.args.x: any key below
        inner = section_of(tp)
        if inner is None:
            raise ConfigError(
                f"{where}'{'.'.join(parts[: i + 1])}' is a value, not a section",
                hint=f"use --set {'.'.join(parts[: i + 1])}=VALUE",
            )
        section = inner
    return section


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.sub=value`` of ``overrides`` applied.

    Values are YAML scalars (``--set training.lr=3e-4``, ``--set lora.target_modules=[q_proj]``,
    ``--set budget.limit=null``). Setting ``training.max_steps`` drops ``training.epochs``
    and the other way round, unless both are set."""
    result = copy.deepcopy(dict(data))
    touched: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not all(parts):
            raise ConfigError(
                f"--set {item}: expected KEY=VALUE with a dotted key",
                hint="e.g. --set training.lr=3e-4",
            )
        _check_path(parts, item)
        _assign(result, parts, _parse_value(raw), item)
        touched.add(key)
    for a, b in _EXCLUSIVE:
        for one, other in ((a, b), (b, a)):
            if one in touched and other not in touched and _get(result, one) is not None:
                _drop(result, other)
    return result


def _assign(data: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    node = data
    section: type[Section] | None = JobSpec
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        inner = section_of(section.hints()[part]) if section is not None else None
        if child is None:
            child = {}
        elif isinstance(child, str) and inner is not None and inner._shorthand is not None:
            child = {inner._shorthand: child}  # model: gpt2  +  --set model.dtype=bf16
        elif not isinstance(child, dict):
            raise ConfigError(
                f"--set {item}: '{'.'.join(parts[: i + 1])}' holds {child!r}, not a mapping",
                hint="fix the YAML, or set the whole value with --set",
            )
        node[part] = child
        node, section = child, inner
    node[parts[-1]] = value


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _drop(data: dict[str, Any], dotted: str) -> None:
    *head, last = dotted.split(".")
    node: Any = data
    for part in head:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def _with_source(e: ConfigError, source: str) -> ConfigError:
    return ConfigError(f"{source}: {e.args[0]}", hint=e.hint)


def spec_from_text(text: str, overrides: Sequence[str] = (), *, source: str = "<spec>") -> JobSpec:
    """A JobSpec from YAML text plus overrides; errors name ``source``."""
    try:
        return JobSpec.from_dict(apply_overrides(parse_yaml(text), overrides))
    except ConfigError as e:
        raise _with_source(e, source) from e


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobSpec:
    """Read and validate the YAML job spec at ``path`` with ``--set`` overrides applied."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(
            f"job spec not found: {p}", hint="create one with `colabjob init --kind lora`"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read job spec {p}: {e}") from e
    return spec_from_text(text, overrides, source=str(p))


def check_local_paths(spec: JobSpec) -> None:
    """Refuse a spec whose local model, tokenizer or data path does not exist (relative
    paths are taken from the current directory). Hub names are not checked: that needs
    the network."""
    refs: list[tuple[str, str | None]] = [
        ("model.name_or_path", spec.model.name_or_path if spec.model else None),
        ("tokenizer.name_or_path", spec.tokenizer.name_or_path),
    ]
    for key, ref in refs:
        if ref is not None and looks_local(ref) and not os.path.exists(os.path.expanduser(ref)):
            raise ConfigError(
                f"{key}: {ref!r} does not exist",
                hint="check the path (relative paths start from the current directory)",
            )
    data = spec.data
    if data is not None and data.is_local:
        source = os.path.expanduser(data.source.removeprefix("file://"))
        if any(c in source for c in "*?["):
            if not glob.glob(source, recursive=True):
                raise ConfigError(
                    f"data.source: no file matches {data.source!r}", hint="check the pattern"
                )
        elif not os.path.exists(source):
            raise ConfigError(
                f"data.source: {data.source!r} does not exist",
                hint="check the path, or give a hub dataset name with data.format: hf",
            )
