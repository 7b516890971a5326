"""A ``colabjob`` stand-in for the startup-script tests (run as a script, not imported).

Until the real CLI resumes jobs, this probe does what the resume step first needs from the
VM's environment and records it: it opens the job URL it was given on GCS (the emulator,
through the ``STORAGE_EMULATOR_HOST`` the script passes on), reads the record, refuses a
moved job, verifies the newest checkpoint byte for byte, and asks the platform layer about
the GCE profile (the fake metadata server, through ``GCE_METADATA_HOST``). It writes what it
saw to ``$STUB_LOG.probe`` as JSON and exits with ``$STUB_RC``.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from colabjob.runner.handoff.transfer import check_not_moved
    from colabjob.runner.platforms import describe_platform
    from colabjob.runner.record import load_record
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.store import open_store

    command, url = argv[1], argv[2]
    platform = argv[argv.index("--platform") + 1]
    store = open_store(url)
    record = load_record(store)
    check_not_moved(store, record)
    latest = CheckpointStore(store).latest(verify="full")
    info = describe_platform(platform=platform)
    seen = {
        "command": command,
        "url": url,
        "job_id": record.job_id,
        "moved_from": record.extras.get("moved_from"),
        "latest_step": latest.step if latest else None,
        "platform": info.name,
        "preemptible": info.preemptible,
    }
    with open(os.environ["STUB_LOG"] + ".probe", "w") as f:
        json.dump(seen, f)
    print(f"probe: job {record.job_id} would resume at step {seen['latest_step']}")
    return int(os.environ.get("STUB_RC", "0"))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
