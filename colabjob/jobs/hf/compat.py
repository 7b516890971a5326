"""Which ``transformers.Trainer`` internals the HF integration relies on, and the check that
they are there.

``colabjob.jobs.hf.trainer`` overrides private Trainer methods (``_run_epoch``,
``_init_training_state``, ...) and reads private attributes (``_tr_loss``, ...). They are not
an API: transformers renames or splits them between releases. Without a check, a version
outside the supported range fails deep inside ``train()`` (an override never called, an
``AttributeError`` mid-epoch) or, worse, trains without resuming exactly. So attaching to a
Trainer first checks every member here and raises ``UnsupportedTransformersError`` naming
the installed version, what is missing and the supported range.

``MIN_TRANSFORMERS`` is the oldest release that has all of them: 5.3.0 split the training
loop into ``_init_training_state`` / ``_run_epoch`` with the loss in ``self._tr_loss``
(4.57 and 5.0-5.2 have one ``_inner_training_loop``). ``pyproject.toml``'s floor and the
README say the same (a test keeps them in step).
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from collections.abc import Iterator
from types import CodeType
from typing import Any

from colabjob.errors import UnsupportedTransformersError

__all__ = [
    "MIN_TRANSFORMERS",
    "REQUIRED_TRAINER_ATTRIBUTES",
    "REQUIRED_TRAINER_METHODS",
    "check_trainer_compat",
    "missing_trainer_members",
]

MIN_TRANSFORMERS = "5.3.0"

# Methods the integration overrides or calls, with the parameters it passes or reads by name
# (an override whose base method is gone, or renamed its parameters, is silently wrong).
REQUIRED_TRAINER_METHODS: dict[str, tuple[str, ...]] = {
    "_init_training_state": (
        "max_steps",
        "num_update_steps_per_epoch",
        "num_train_epochs",
        "resume_from_checkpoint",
        "trial",
    ),
    "_run_epoch": ("epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch"),
    "_get_dataloader": (),
    "_save_checkpoint": ("model", "trial"),
    "_remove_unused_columns": ("description",),
    "_get_collator_with_removed_columns": ("description",),
    "get_batch_samples": ("epoch_iterator", "num_batches", "device"),
}

# Instance attributes the Trainer's own code sets and the integration reads or writes
# (the running loss, the last logged step, the batch size auto_find_batch_size settled on).
REQUIRED_TRAINER_ATTRIBUTES: tuple[str, ...] = (
    "_tr_loss",
    "_globalstep_last_logged",
    "_train_batch_size",
)


def _codes(code: CodeType) -> Iterator[CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _codes(const)


def _attribute_names(cls: type) -> set[str]:
    """Every name the class's own functions (and its bases') use as an attribute or global.
    Read from the compiled code, not the source: cheap, and works without source files."""
    names: set[str] = set()
    for klass in cls.__mro__:
        for member in vars(klass).values():
            func = getattr(member, "__func__", member)  # staticmethod / classmethod
            code = getattr(func, "__code__", None)
            if isinstance(code, CodeType):
                for c in _codes(code):
                    names.update(c.co_names)
    return names


def _accepts(method: Any, params: tuple[str, ...]) -> bool:
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):  # no signature to read: trust the name
        return True
    kinds = {p.kind for p in sig.parameters.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return True
    return all(p in sig.parameters for p in params)


@functools.cache
def missing_trainer_members(trainer_cls: type) -> tuple[str, ...]:
    """The required members ``trainer_cls`` lacks (or has with other parameters), in order."""
    missing: list[str] = []
    for name, params in REQUIRED_TRAINER_METHODS.items():
        method = getattr(trainer_cls, name, None)
        if not callable(method):
            missing.append(name)
        elif not _accepts(method, params):
            missing.append(f"{name}({', '.join(params)})")
    used = _attribute_names(trainer_cls)
    missing += [name for name in REQUIRED_TRAINER_ATTRIBUTES if name not in used]
    return tuple(missing)


def installed_transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def check_trainer_compat(trainer_cls: type) -> None:
    """Raise ``UnsupportedTransformersError`` unless ``trainer_cls`` (``transformers.Trainer``
    or a stand-in) has every member the integration relies on."""
    missing = missing_trainer_members(trainer_cls)
    if missing:
        raise UnsupportedTransformersError(
            f"transformers {installed_transformers_version()} is not supported by colabjob's "
            f"HF Trainer integration: {trainer_cls.__name__} lacks {', '.join(missing)} "
            f"(supported: transformers>={MIN_TRANSFORMERS})",
            hint=f"pip install -U 'transformers>={MIN_TRANSFORMERS}'",
        )
