"""Handing a paused job off to a GCP VM: ``to_vm`` orchestrates it, ``prepare`` checks the job
and its destination and moves it (for every engine), ``transfer`` copies the job between
stores, ``gcloud`` builds the VM command, ``startup_script`` is what the VM runs."""
