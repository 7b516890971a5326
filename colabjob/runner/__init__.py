"""Time and control: who runs a job, for how long, and when it must stop.

``states`` (the job state machine), ``record`` (``job.json``), ``platforms`` (session
limits per platform), ``budget`` (predictive stop), ``watchdog`` (every reason to stop as
one event), ``stop_request`` (``colabjob stop``), ``lease/`` (one live runner per job:
``claim`` holds it with its fencing epoch, ``info`` reads it), ``options`` (how a segment
runs), ``segment`` (``session()``/``run_segment``: one segment from lease to release;
``segment_run`` opens it, ``segment_close`` closes it), ``supervisor``/``child_protocol``
(the CLI's runner process), ``launch`` (N ranks; ``ranks``: how many fit, their
environment), ``signals`` (forwarding), ``history`` (metrics read back), ``repair``
(``job.json`` rebuilt), ``handoff/`` (to a GCP VM: ``to_vm``, ``prepare``, ``transfer``,
``gcloud``, ``startup_script``). The clock is ``colabjob.clock``.
The time and control modules import no torch (``segment`` does: it runs training);
import the submodule you need.
"""
