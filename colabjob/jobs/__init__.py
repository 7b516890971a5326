"""What is trained and its exact state (the only layer that imports torch).

``session`` (the Session API), ``decision`` (the one stop/save decision at a step boundary,
torch-free), ``policy`` (``StopPolicy``, ``StopReason``), ``context`` (what a segment receives
from the runner), ``tracking`` (the objects a Session tracks), ``distributed`` (process group
and agreed decisions), ``checkpointing/`` (snapshot, commit, failures), ``state/`` (the
checkpoint's files and how they are written and read), ``data/`` (resumable order and
loaders, training text, tokenizer), ``hf/`` (the HF Trainer integration), ``kinds/`` (the
built-in job kinds), ``defaults`` (precision, batch size, resources), ``progress`` and
``step_metrics`` (what a loop reports), ``demo`` (the embedded demo job).
"""
