"""Child process for the SIGKILL test: one segment of a ``finetune`` job that checkpoints
every 2 steps in the background and SIGKILLs itself right after step ``kill_at``.

    python -m tests.jobs.kinds_child URL MODEL_DIR DATA KILL_AT
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from colabjob.jobs.kinds import run_kind
from tests.jobs.kind_fixtures import StopAfter, make_ctx, spec_for


class KillAfter(StopAfter):
    def observe_step(self, seconds: float) -> None:
        super().observe_step(seconds)
        if self.steps >= int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    url, model, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    spec = spec_for("finetune", model_dir=model, data_path=data)
    run_kind(spec, make_ctx(url, KillAfter(None), every_steps=2, max_steps=8))
