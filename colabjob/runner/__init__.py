"""Time and control: who runs a job, for how long, and when it must stop.

``states`` (the job state machine), ``record`` (``job.json``), ``platforms`` (session
limits per platform), ``budget`` (predictive stop), ``watchdog`` (every reason to stop as
one event), ``lease`` (one live runner per job, fencing epoch; ``lease_info`` reads it),
``clock`` (injected time), ``segment`` (``session()``/``run_segment``: one segment from
lease to release; ``segment_run`` opens and closes it), ``supervisor``/``child`` (the CLI's
runner process), ``launch`` (N ranks), ``handoff``/``transfer``/``gcloud`` (to a GCP VM).
The time and control modules import no torch (``segment`` does: it runs training);
import the submodule you need.
"""
