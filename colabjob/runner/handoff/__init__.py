"""Handing a paused job off to a GCP VM: ``to_vm`` orchestrates it, ``transfer`` moves the job
between stores, ``gcloud`` builds the VM command, ``startup_script`` is what the VM runs."""
