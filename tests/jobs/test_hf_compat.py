"""The check of the private ``transformers.Trainer`` internals the HF integration relies on:
a Trainer lacking one is refused at attach time with an error naming it, the installed
transformers version and the supported range; the installed Trainer passes; the dependency
floor in ``pyproject.toml`` is the check's ``MIN_TRANSFORMERS``."""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from colabjob.errors import ConfigError, UnsupportedTransformersError
from colabjob.jobs.hf import compat as hf_compat
from colabjob.jobs.hf.compat import (
    MIN_TRANSFORMERS,
    REQUIRED_TRAINER_ATTRIBUTES,
    REQUIRED_TRAINER_METHODS,
    check_trainer_compat,
    missing_trainer_members,
)
from tests.jobs.kind_fixtures import make_ctx

REPO = Path(__file__).resolve().parents[2]
VERSION = importlib.metadata.version("transformers")


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    missing_trainer_members.cache_clear()
    yield
    missing_trainer_members.cache_clear()


class _Base:
    """A stand-in Trainer with every required method but ``_init_training_state``."""

    def __init__(self) -> None:
        self._train_batch_size = 8

    def _run_epoch(
        self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch
    ):
        pass

    def _get_dataloader(self, dataset, description):
        pass

    def _save_checkpoint(self, model, trial):
        pass

    def _remove_unused_columns(self, dataset, description=None):
        pass

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        pass

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        pass


class _Complete(_Base):
    """Every required member: the shape of transformers >= 5.3."""

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        self._tr_loss = 0.0
        self._globalstep_last_logged = 0


class _NoRunEpoch(_Complete):
    """Like transformers 4.x and 5.0-5.2: one big ``_inner_training_loop``, no ``_run_epoch``."""

    _run_epoch = None


class _OldLossName(_Base):
    """The running loss kept under another name (as a later release might rename it)."""

    def _init_training_state(self, *args: Any, **kwargs: Any) -> None:
        self.running_loss = 0.0
        self._globalstep_last_logged = 0


class _RenamedParameter(_Complete):
    def _run_epoch(self, model, epoch_index, loader):
        pass


def test_the_installed_trainer_has_every_member() -> None:
    from transformers import Trainer

    assert missing_trainer_members(Trainer) == ()
    check_trainer_compat(Trainer)
    assert missing_trainer_members(_Complete) == ()
    check_trainer_compat(_Complete)


def test_a_missing_method_is_named_with_the_version_and_the_range() -> None:
    with pytest.raises(UnsupportedTransformersError) as info:
        check_trainer_compat(_NoRunEpoch)
    message = str(info.value)
    assert f"transformers {VERSION} is not supported" in message
    assert "_NoRunEpoch lacks _run_epoch" in message
    assert f"(supported: transformers>={MIN_TRANSFORMERS})" in message
    assert f"pip install -U 'transformers>={MIN_TRANSFORMERS}'" in message  # the hint
    assert isinstance(info.value, ConfigError) and info.value.exit_code == 2
    assert missing_trainer_members(_NoRunEpoch) == ("_run_epoch",)


def test_a_missing_attribute_and_a_renamed_parameter_are_named() -> None:
    assert missing_trainer_members(_OldLossName) == ("_tr_loss",)
    with pytest.raises(UnsupportedTransformersError, match="lacks _tr_loss "):
        check_trainer_compat(_OldLossName)
    got = missing_trainer_members(_RenamedParameter)
    assert got == ("_run_epoch(epoch, train_dataloader, steps_in_epoch, "
                   "num_update_steps_per_epoch)",)


def test_every_member_the_integration_touches_is_checked() -> None:
    """Each private Trainer member colabjob uses is in the check's lists: the mixin's
    overrides and its ``self.``/``super().`` members (its ``self`` is the Trainer; its
    checkpoint half is ``checkpoints.py``), and
    ``trainer.`` members anywhere in the integration."""
    jobs = REPO / "colabjob" / "jobs"
    mixin = "".join((jobs / "hf" / name).read_text() for name in ("trainer.py", "checkpoints.py"))
    used = set(re.findall(r"(?:self|super\(\))\.(_[a-z][a-z_]*)\b", mixin))
    used |= set(re.findall(r"^    def (_[a-z][a-z_]*)\(", mixin, flags=re.M))
    scanned = [*(jobs / "hf").glob("*.py"), jobs / "kinds" / "hf_trainer.py"]
    for path in [*scanned, REPO / "colabjob" / "hf.py"]:
        used |= set(re.findall(r"\btrainer\.(_[a-z][a-z_]*)\b", path.read_text()))
    trainers = {name for name in used if not name.startswith("_colabjob")}
    assert {"_run_epoch", "_tr_loss", "_save_checkpoint"} <= trainers  # the scan sees them
    checked = set(REQUIRED_TRAINER_METHODS) | set(REQUIRED_TRAINER_ATTRIBUTES)
    assert trainers <= checked, sorted(trainers - checked)


def test_attaching_to_an_unsupported_trainer_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from colabjob.jobs.hf.trainer import make_resumable

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    monkeypatch.setattr(
        hf_compat, "REQUIRED_TRAINER_ATTRIBUTES", (*REQUIRED_TRAINER_ATTRIBUTES, "_gone_in_6")
    )
    with pytest.raises(UnsupportedTransformersError, match=f"transformers {VERSION} .*_gone_in_6"):
        make_resumable(trainer, make_ctx(tmp_path / "job"))


def test_the_dependency_floor_is_the_checked_minimum() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"transformers>={MIN_TRANSFORMERS}"' in pyproject
    assert f"transformers>={MIN_TRANSFORMERS}" in (REPO / "README.md").read_text()
