"""The checkpoint manifest: what a committed checkpoint is, and how its bytes are checked.

A checkpoint is the prefix ``ckpt/<step:012d>-<uid>/``; it exists only once its
``manifest.json`` does. The manifest is a small JSON document listing every file with its
size and sha256 (and crc32c where the backend reports one), the step, the lease epoch that
wrote it (fencing token), when, with which versions, under which config hash, plus a free
``meta`` dict. This module owns its layout, its validation and the chunked hashing that
both the writer and the reader use, so the two can never disagree about a digest.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from colabjob.errors import ConfigError, CorruptCheckpointError

FORMAT = "colabjob.checkpoint/1"
MANIFEST = "manifest.json"
CKPT_DIR = "ckpt"
QUARANTINE_DIR = "quarantine"
CHUNK = 8 * 1024 * 1024

_DIR_RE = re.compile(r"^(\d{12})-([0-9a-z]{4,32})$")


def checkpoint_dir(step: int, uid: str) -> str:
    """The directory name (not the prefix) of a checkpoint: ``<step:012d>-<uid>``."""
    return f"{step:012d}-{uid}"


def parse_dir(name: str) -> tuple[int, str] | None:
    """``(step, uid)`` of a checkpoint directory name, or None for anything else."""
    m = _DIR_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def check_name(name: str) -> str:
    """A file name inside a checkpoint: relative, ``/``-separated, no ``..``, not reserved."""
    p = PurePosixPath(name)
    if (
        not name
        or name != str(p)
        or p.is_absolute()
        or any(part in ("", ".", "..") for part in p.parts)
        or "\\" in name
        or name == MANIFEST
    ):
        raise ConfigError(
            f"bad checkpoint file name {name!r}",
            hint="use a relative '/'-separated name without '..'; 'manifest.json' is reserved",
        )
    return name


class Digest:
    """Streaming size + sha256 (+ crc32c) of one file. hashlib releases the GIL on big chunks."""

    def __init__(self, *, crc32c: bool) -> None:
        self.size = 0
        self._sha = hashlib.sha256()
        self._crc: Any = None
        if crc32c:
            import google_crc32c

            self._crc = google_crc32c.Checksum()

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._sha.update(chunk)
        if self._crc is not None:
            self._crc.update(chunk)

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "sha256": self._sha.hexdigest()}
        if self._crc is not None:
            # GCS's own encoding: base64 of the big-endian uint32.
            out["crc32c"] = base64.b64encode(self._crc.digest()).decode("ascii")
        return out


def digest_bytes(data: bytes, *, crc32c: bool) -> dict[str, Any]:
    d = Digest(crc32c=crc32c)
    d.update(data)  # one call: both hashers take any length (and crc32c wants real bytes)
    return d.entry()


def digest_stream(f: BinaryIO, *, crc32c: bool) -> dict[str, Any]:
    d = Digest(crc32c=crc32c)
    while chunk := f.read(CHUNK):
        d.update(chunk)
    return d.entry()


def digest_file(path: str | Path, *, crc32c: bool) -> dict[str, Any]:
    with open(path, "rb") as f:
        return digest_stream(f, crc32c=crc32c)


def mismatch(name: str, expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str | None:
    """Why ``actual`` is not ``expected`` (sizes first, then every digest both carry), or None."""
    if actual["size"] != expected["size"]:
        return f"{name}: size {actual['size']} != manifest {expected['size']}"
    for key in ("sha256", "crc32c"):
        if key in actual and key in expected and actual[key] != expected[key]:
            return f"{name}: {key} mismatch"
    return None


def default_versions() -> dict[str, str]:
    import colabjob

    version = getattr(colabjob, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("colabjob")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return {"colabjob": str(version), "python": platform.python_version()}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The parsed, validated content of one ``manifest.json``."""

    step: int
    uid: str
    epoch: int
    created_at: float
    files: dict[str, dict[str, Any]]
    versions: dict[str, str] = field(default_factory=dict)
    config_hash: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ConfigError(f"checkpoint step must be >= 0, got {self.step}")
        for name, entry in self.files.items():
            check_name(name)
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
                raise ConfigError(f"manifest entry for {name!r} lacks size/sha256")

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "step": self.step,
            "uid": self.uid,
            "epoch": self.epoch,
            "created_at": self.created_at,
            "files": self.files,
            "versions": self.versions,
            "config_hash": self.config_hash,
            "meta": self.meta,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.to_json())
        return out

    @classmethod
    def parse(cls, data: bytes, *, dirname: str) -> Manifest:
        """Parse and validate; anything wrong is a ``CorruptCheckpointError``."""
        try:
            doc = json.loads(data.decode("utf-8"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            m = cls(
                step=int(doc["step"]),
                uid=str(doc["uid"]),
                epoch=int(doc["epoch"]),
                created_at=float(doc["created_at"]),
                files={str(k): dict(v) for k, v in doc["files"].items()},
                versions=dict(doc.get("versions", {})),
                config_hash=str(doc.get("config_hash", "")),
                meta=dict(doc.get("meta", {})),
            )
        except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
            raise CorruptCheckpointError(f"bad manifest in {dirname}: {e}") from e
        if checkpoint_dir(m.step, m.uid) != dirname:
            raise CorruptCheckpointError(
                f"manifest in {dirname} says step {m.step} uid {m.uid}: it was moved or edited"
            )
        return m


@dataclass(frozen=True, kw_only=True)
class CommitStats:
    """What one commit cost, so the runner's budget can learn write and upload throughput."""

    nbytes: int
    nfiles: int
    write_seconds: float  # serialising / staging to local disk
    upload_seconds: float  # hashing + uploading every file (in parallel)
    commit_seconds: float  # fence check + manifest creation
    total_seconds: float

    @property
    def upload_bytes_per_second(self) -> float:
        return self.nbytes / self.upload_seconds if self.upload_seconds > 0 else float("inf")


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """One committed checkpoint: its step, its prefix, its manifest (as a dict) and, for a
    checkpoint this process just committed, what the commit cost."""

    step: int
    prefix: str
    manifest: dict[str, Any] = field(compare=False, repr=False)
    stats: CommitStats | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        head, _, name = self.prefix.partition("/")
        parsed = parse_dir(name)
        if head != CKPT_DIR or parsed is None or parsed[0] != self.step:
            raise ConfigError(f"not a checkpoint prefix for step {self.step}: {self.prefix!r}")

    @classmethod
    def of(cls, m: Manifest, *, stats: CommitStats | None = None) -> CheckpointInfo:
        prefix = f"{CKPT_DIR}/{checkpoint_dir(m.step, m.uid)}"
        return cls(step=m.step, prefix=prefix, manifest=m.to_dict(), stats=stats)

    @property
    def dirname(self) -> str:
        return self.prefix.partition("/")[2]

    @property
    def uid(self) -> str:
        return str(self.manifest["uid"])

    @property
    def epoch(self) -> int:
        return int(self.manifest["epoch"])

    @property
    def created_at(self) -> float:
        return float(self.manifest["created_at"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest["files"])

    @property
    def nbytes(self) -> int:
        return sum(int(e["size"]) for e in self.manifest["files"].values())

    @property
    def config_hash(self) -> str:
        return str(self.manifest.get("config_hash", ""))

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.manifest.get("meta", {}))

    @property
    def versions(self) -> dict[str, str]:
        return dict(self.manifest.get("versions", {}))

    def key(self, name: str) -> str:
        """The store key of one of its files (or of ``manifest.json``)."""
        return f"{self.prefix}/{name}"

    def order(self) -> tuple[int, float, str]:
        """Newest is greatest: by step, then created_at, then uid. Never by mtime."""
        return (self.step, self.created_at, self.uid)
