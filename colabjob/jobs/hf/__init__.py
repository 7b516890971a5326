"""The HF Trainer integration: ``trainer`` makes a ``transformers.Trainer`` session-resumable;
``callback`` decides at each step, ``data`` supplies the resumable loader, ``finish`` reports
across sessions, ``compat`` checks the Trainer internals it relies on."""
