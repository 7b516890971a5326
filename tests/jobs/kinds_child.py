"""Child process for the SIGKILL tests: one segment of a job of ``KIND`` that checkpoints
every 2 steps in the background and SIGKILLs itself after step ``kill_at``, once one of
those commits has completed.

    python -m tests.jobs.kinds_child URL MODEL_DIR DATA KILL_AT KIND
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from colabjob.jobs.kinds import run_kind
from tests.jobs.kind_fixtures import StopAfter, make_ctx, sigkill_spec


class KillAfter(StopAfter):
    """Killed after step KILL_AT, once a background commit has been reaped: the kill then
    always finds a committed checkpoint behind it, however slow this machine is. On a slow
    machine the first reap may come only at the segment's end (the final save reaps the
    background commit before writing its own): the kill is then there, before the final
    commit, so it happens in every run."""

    def _kill_when_due(self) -> None:
        if self.steps >= int(sys.argv[4]) and self.checkpoints >= 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def observe_step(self, seconds: float) -> None:
        super().observe_step(seconds)
        self._kill_when_due()

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        super().observe_checkpoint(
            write_seconds=write_seconds, upload_seconds=upload_seconds, nbytes=nbytes
        )
        self._kill_when_due()


if __name__ == "__main__":
    url, model, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    spec = sigkill_spec(sys.argv[5], model_dir=model, data_path=data)
    run_kind(spec, make_ctx(url, KillAfter(None), every_steps=2, max_steps=8))
