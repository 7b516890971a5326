"""``check_loadable``: a checkpoint is refused for the same content ``restore()`` refuses,
with the same error class, before anything is loaded; a sound one (every slot, an extra
object) passes and stays loadable; a model that no longer fits is not its business.

Each damage is real bytes on disk in a checkpoint written by ``write_snapshot``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from colabjob.errors import (
    CheckpointError,
    CorruptCheckpointError,
    ResumeError,
    UnsafeCheckpointError,
)
from colabjob.jobs.data import make_loader
from colabjob.jobs.state.capture import snapshot, write_snapshot
from colabjob.jobs.state.check import check_loadable
from colabjob.jobs.state.format import (
    METRICS_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    OPTIMIZER_TENSORS_FILE,
    STATE_FILE,
    TENSORS_FILE,
    Counters,
)
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.tracked import Tracked

from .helpers import NoisyDataset, Trainer


class _Evil:
    """Unpickling this would run a command: it must never be executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _trainer(seed: int) -> Trainer:
    loader = make_loader(NoisyDataset(8), batch_size=4, seed=1)
    return Trainer.build(loader, init_seed=seed, total_steps=2)


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint after one step with every slot (model, optimizer, scheduler, scaler,
    loader, RNGs, metrics)."""
    tr = _trainer(0)
    tr.train_until(1)
    root = tmp_path_factory.mktemp("sound") / "ckpt"
    tr.save(root)
    return root


def _state(root: Path) -> dict[str, Any]:
    return json.loads((root / STATE_FILE).read_text())


def _set_state(root: Path, doc: dict[str, Any]) -> None:
    (root / STATE_FILE).write_text(json.dumps(doc))


def _pickled_optimizer(root: Path) -> None:
    doc = _state(root)
    del doc["optimizer_file"]  # only an older checkpoint's optimizer.pt is unpickled
    _set_state(root, doc)
    (root / OPTIMIZER_FILE).write_bytes(pickle.dumps({"optimizer": _Evil(root / "pwned")}))


def _missing_data_tensor(root: Path) -> None:
    doc = _state(root)
    doc["data"] = {"__tensor__": "data/#999"}
    _set_state(root, doc)


def _bad_counters(root: Path) -> None:
    doc = _state(root)
    doc["counters"]["step"] = -1
    _set_state(root, doc)


def _truncated(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes((root / name).read_bytes()[:-5])


def _replaced(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(data)


# (damage, the error check_loadable raises, the one restore raises: the same or its base)
DAMAGE: dict[str, tuple[Callable[[Path], None], type[Exception], type[Exception]]] = {
    "pickled optimizer.pt": (_pickled_optimizer, UnsafeCheckpointError, UnsafeCheckpointError),
    "model not safetensors": (
        _replaced(MODEL_FILE, b"\x00" * 64 + b"not safetensors"),
        CorruptCheckpointError,
        CorruptCheckpointError,
    ),
    "model truncated": (_truncated(MODEL_FILE), CorruptCheckpointError, CorruptCheckpointError),
    "optimizer garbage": (
        _replaced(OPTIMIZER_TENSORS_FILE, b"garbage" * 9),
        CorruptCheckpointError,
        CorruptCheckpointError,
    ),
    "state tensors truncated": (
        _truncated(TENSORS_FILE),
        CorruptCheckpointError,
        CorruptCheckpointError,
    ),
    "state.json not JSON": (
        _replaced(STATE_FILE, b"{not json"),
        CorruptCheckpointError,
        CorruptCheckpointError,
    ),
    "state.json other format": (
        _replaced(STATE_FILE, b'{"format": "other"}'),
        CorruptCheckpointError,
        CorruptCheckpointError,
    ),
    "data names a missing tensor": (_missing_data_tensor, CorruptCheckpointError, CheckpointError),
    "metrics not JSON": (
        _replaced(METRICS_FILE, b"[1,"),
        CorruptCheckpointError,
        CorruptCheckpointError,
    ),
}


def test_a_sound_checkpoint_passes_and_still_loads(sound: Path, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(sound, root)
    check_loadable(root, json_files=("absent.json",))  # a file that is not there is skipped
    fresh = _trainer(3)
    got = restore(root, replace(fresh.tracked(), geometry=None))
    assert got.counters.step == 1


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_content_is_refused_like_restore_refuses_it(
    sound: Path, tmp_path: Path, name: str
) -> None:
    damage, checked, restored = DAMAGE[name]
    root = tmp_path / "ckpt"
    shutil.copytree(sound, root)
    damage(root)
    files = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(checked) as caught:
        check_loadable(root)
    assert isinstance(caught.value, (CorruptCheckpointError, UnsafeCheckpointError))
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files  # nothing written
    assert not (root / "pwned").exists()  # a pickle is refused, never executed

    fresh = _trainer(3)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(restored):
        restore(root, replace(fresh.tracked(), geometry=None))
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_another_json_file_must_parse(sound: Path, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(sound, root)
    (root / "trainer_state.json").write_text("{")
    check_loadable(root)  # not named: not checked
    with pytest.raises(CorruptCheckpointError, match=r"trainer_state\.json"):
        check_loadable(root, json_files=("trainer_state.json",))


def test_a_model_that_no_longer_fits_is_not_damage(tmp_path: Path) -> None:
    """The weights of another model are a changed job (restore's ResumeError), not a
    damaged checkpoint: check_loadable does not compare them with any model."""
    write_snapshot(snapshot(Tracked(model=torch.nn.Linear(3, 2)), counters=Counters()), tmp_path)
    check_loadable(tmp_path)
    with pytest.raises(ResumeError):
        restore(tmp_path, Tracked(model=_trainer(3).model))


def test_counters_that_do_not_decode_are_refused_before_anything_loads(
    sound: Path, tmp_path: Path
) -> None:
    """``restore()`` reads the counters only after loading the objects (its ValueError comes
    too late to leave them untouched); the check refuses them first."""
    root = tmp_path / "ckpt"
    shutil.copytree(sound, root)
    _bad_counters(root)
    with pytest.raises(CorruptCheckpointError, match="counters"):
        check_loadable(root)
