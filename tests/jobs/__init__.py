"""Tests of colabjob.jobs: exact state, resumable data, sessions."""
