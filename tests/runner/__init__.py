"""Tests of colabjob.runner."""
