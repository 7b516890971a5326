"""Bytes that outlive the VM: one ``Store`` interface over local disk, the Colab Drive mount,
GCS and memory, plus the single retry policy every backend goes through. Never imports torch;
backends are imported only when a URL of their scheme is opened."""

from colabjob.storage.retry import RetryPolicy, classify
from colabjob.storage.store import Store, Version, open_store

__all__ = ["RetryPolicy", "Store", "Version", "classify", "open_store"]
