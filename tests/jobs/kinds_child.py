"""Child process for the SIGKILL tests: one segment of a job of ``KIND`` that checkpoints
every 2 steps in the background and SIGKILLs itself after step ``kill_at``, once one of
those commits has completed.

    python -m tests.jobs.kinds_child URL MODEL_DIR DATA KILL_AT KIND
"""

from __future__ import annotations

import sys
from pathlib import Path

from colabjob.jobs.kinds import run_kind
from tests.jobs.kind_fixtures import KillAfter, make_ctx, sigkill_spec

if __name__ == "__main__":
    url, model, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    spec = sigkill_spec(sys.argv[5], model_dir=model, data_path=data)
    run_kind(spec, make_ctx(url, KillAfter(int(sys.argv[4])), every_steps=2, max_steps=8))
