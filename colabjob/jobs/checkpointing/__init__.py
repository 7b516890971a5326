"""Saving during training, for every path: ``saver`` restores and snapshots a Session's
tracked objects, ``committer`` commits snapshots (background or final), ``failures`` stops a
run whose checkpoints keep failing."""
