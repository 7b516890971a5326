"""A process whose DataLoader worker (``spawn``, ``quiet_workers``) is still starting when
the process SIGKILLs itself: the worker reaches its init only after its parent is gone.

    python -m tests.jobs.orphan_child STARTED_FILE

The dataset sleeps ``SLOW_UNPICKLE_S`` seconds while the worker unpickles it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from colabjob.jobs.data.loader import quiet_workers


class SlowDataset(Dataset[int]):
    def __init__(self) -> None:
        self.size = 4  # some state: unpickling calls __setstate__ only for a non-empty one

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index

    def __setstate__(self, state: dict[str, Any]) -> None:
        time.sleep(float(os.environ["SLOW_UNPICKLE_S"]))
        self.__dict__.update(state)


if __name__ == "__main__":
    loader = DataLoader(
        SlowDataset(), num_workers=1, worker_init_fn=quiet_workers(),
        multiprocessing_context="spawn",
    )
    iterator = iter(loader)  # starts the worker
    Path(sys.argv[1]).write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
