"""Time and control: who runs a job, for how long, and when it must stop.

``states`` (the job state machine), ``record`` (``job.json``), ``platforms`` (session
limits per platform), ``budget`` (predictive stop), ``watchdog`` (every reason to stop as
one event), ``lease`` (one live runner per job, fencing epoch), ``clock`` (injected time).
Nothing here imports torch; import the submodule you need.
"""
