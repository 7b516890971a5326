"""``resumable()`` on a job whose lease a live runner holds: in a script, the CLI's one-line
message and exit 2 (no traceback), with a hint naming the keyword argument ``force=True``."""

from __future__ import annotations

from pathlib import Path

import pytest

from colabjob.storage.store import open_store
from tests.cli.builders import hold_lease
from tests.fakes import FakeClock
from tests.jobs.kind_fixtures import tiny_model_dir, write_text_data
from tests.jobs.test_hf import user_script


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-assets")
    data = write_text_data(root / "data", docs=30, words=40)
    return {"data": data, "model": tiny_model_dir(root / "model", data)}


def test_a_held_lease_exits_2_with_one_line(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = tmp_path / "job"
    hold_lease(open_store(str(url)), step=3)
    with pytest.raises(SystemExit) as e:
        user_script(url, assets, tmp_path / "out", clock=FakeClock(), budget="1h",
                    exit_on_pause=True)
    assert e.value.code == 2
    err = capsys.readouterr().err
    message, hint = err.splitlines()[-2:]
    assert message.startswith(f"colabjob: error: job {url} is already running on vm (colab, ")
    assert "`force=True`" in hint and "--force" not in hint and "Traceback" not in err
