"""Training text for the built-in kinds: read, tokenize, pack into fixed-length samples.

Sources (``DataSpec.source_format``): local ``.txt`` files (each file one document), JSON
lines (``.jsonl``/``.json``, optionally ``.gz``; the ``text_field`` of each object), Parquet
(the ``text_field`` column), each as a file, a directory (searched recursively) or a glob,
always in sorted order; or a hub dataset through ``datasets.load_dataset`` (``split``,
``config_name``), which reads the local cache when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
is set. With ``packing`` documents are joined with EOS and cut into ``seq_len`` blocks (the
tail that does not fill a block is dropped); without it each document is one sample,
truncated and right-padded (labels -100 on padding). The result is a map-style dataset of
token tensors (``PackedDataset``/``PaddedDataset``), so the resumable sampler seeks in it in
O(1). A streamed hub dataset becomes a ``PackedStream`` whose state is the source's own
``state_dict()`` plus the partial block, so it resumes without re-reading.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, IterableDataset

from colabjob.errors import ConfigError

if TYPE_CHECKING:
    from colabjob.config import DataSpec

__all__ = [
    "PackedDataset",
    "PackedStream",
    "PaddedDataset",
    "build_dataset",
    "iter_texts",
    "pack_tokens",
    "resolve_files",
    "tokenize_texts",
]

_SUFFIXES = {
    "text": (".txt", ".text", ".md", ".py"),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "parquet": (".parquet",),
}


def resolve_files(source: str, fmt: str) -> list[Path]:
    """The files a local ``source`` names, sorted: a file, a directory or a glob."""
    if source.startswith("file://"):
        source = source[len("file://") :]
    source = os.path.expanduser(source)
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    elif Path(source).is_dir():
        suffixes = _SUFFIXES.get(fmt, ())
        files = sorted(
            p for p in Path(source).rglob("*") if p.is_file() and p.name.lower().endswith(suffixes)
        )
    elif Path(source).is_file():
        files = [Path(source)]
    else:
        raise ConfigError(
            f"data.source: {source!r} does not exist",
            hint="give a local file, directory or glob, or a hub dataset name with format: hf",
        )
    if not files:
        raise ConfigError(f"data.source: no {fmt} files under {source!r}")
    return files


def _jsonl_lines(path: Path) -> Iterator[str]:
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def _field(row: Any, field: str, where: str) -> str:
    if not isinstance(row, dict) or field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ConfigError(
            f"data.text_field: {where} has no {field!r} (has {keys})",
            hint="set data.text_field to the key holding the text",
        )
    value = row[field]
    return value if isinstance(value, str) else str(value)


def iter_texts(spec: DataSpec) -> Iterator[str]:
    """Every document of the data source, in a fixed order."""
    fmt = spec.source_format
    if fmt == "hf":
        yield from _hub_texts(spec)
        return
    for path in resolve_files(spec.source, fmt):
        if fmt == "text":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif fmt == "jsonl":
            for n, line in enumerate(_jsonl_lines(path), start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from e
                    yield _field(row, spec.text_field, f"{path}:{n}")
        else:
            yield from _parquet_texts(path, spec.text_field)


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise ConfigError(
            f"data.text_field: {path} has no column {field!r} (has {table.schema_arrow.names})"
        )
    for batch in table.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


def _load_hub(spec: DataSpec) -> Any:
    import datasets

    try:
        return datasets.load_dataset(
            spec.source, name=spec.config_name, split=spec.split, streaming=spec.streaming
        )
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ConfigError(
            f"data.source: cannot load hub dataset {spec.source!r} (split {spec.split!r}): {e}",
            hint="check the name and split, or give a local file",
        ) from e


def _hub_texts(spec: DataSpec) -> Iterator[str]:
    for i, row in enumerate(_load_hub(spec)):
        yield _field(row, spec.text_field, f"row {i} of {spec.source}")


def tokenize_texts(
    tokenizer: Any, texts: Iterable[str], *, chunk: int = 256
) -> Iterator[list[int]]:
    """Token ids of each text (no special tokens), tokenized ``chunk`` texts at a time."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= chunk:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def pack_tokens(docs: Iterable[list[int]], *, seq_len: int, eos_id: int) -> torch.Tensor:
    """Documents joined with ``eos_id`` after each, cut into ``[n, seq_len]`` int32 blocks."""
    pieces: list[torch.Tensor] = []
    for ids in docs:
        pieces.append(torch.tensor([*ids, eos_id], dtype=torch.int32))
    flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)
    n = flat.numel() // seq_len
    return flat[: n * seq_len].reshape(n, seq_len).clone()


class PackedDataset(Dataset[dict[str, torch.Tensor]]):
    """Fixed-length blocks of token ids; each sample is its own causal-LM target."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be [n, seq_len], got {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index].long()
        return {"input_ids": ids, "labels": ids.clone()}


class PaddedDataset(Dataset[dict[str, torch.Tensor]]):
    """One document per sample, truncated to ``seq_len`` and right-padded."""

    def __init__(self, docs: Iterable[list[int]], *, seq_len: int, pad_id: int, eos_id: int):
        rows = [[*ids[: seq_len - 1], eos_id] for ids in docs if ids]
        self.lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        self.ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.int32)
        for i, r in enumerate(rows):
            self.ids[i, : len(r)] = torch.tensor(r, dtype=torch.int32)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index].long()
        n = int(self.lengths[index])
        mask = torch.zeros_like(ids)
        mask[:n] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PackedStream(IterableDataset[dict[str, torch.Tensor]]):
    """Packing over a streamed dataset with a ``state_dict()`` (HF ``datasets.IterableDataset``).

    State: the source's state after the last document read, plus the tokens of the block
    being filled, so a resume continues mid-block without re-reading. One reader only
    (``num_workers=0``).
    """

    def __init__(self, source: Any, tokenizer: Any, *, text_field: str, seq_len: int, eos_id: int):
        self.source, self.tokenizer = source, tokenizer
        self.text_field, self.seq_len, self.eos_id = text_field, seq_len, eos_id
        self.buffer: list[int] = []
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.buffer = epoch, []
            set_epoch = getattr(self.source, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None:
            raise ConfigError("a streamed dataset is read by one process: set num_workers: 0")
        for row in self.source:
            text = _field(row, self.text_field, "a streamed row")
            self.buffer.extend(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self.buffer.append(self.eos_id)
            while len(self.buffer) >= self.seq_len:
                block, self.buffer = self.buffer[: self.seq_len], self.buffer[self.seq_len :]
                ids = torch.tensor(block, dtype=torch.long)
                yield {"input_ids": ids, "labels": ids.clone()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.state_dict(),
            "buffer": list(self.buffer),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self.buffer, self.epoch = [int(t) for t in state["buffer"]], int(state["epoch"])


def build_dataset(spec: DataSpec, tokenizer: Any) -> Dataset[Any] | PackedStream:
    """The training dataset of a spec's data section, tokenized with ``tokenizer``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token", hint="use a tokenizer with one")
    if spec.source_format == "hf" and spec.streaming:
        if not spec.packing:
            raise ConfigError("data.streaming needs data.packing: true")
        return PackedStream(
            _load_hub(spec), tokenizer, text_field=spec.text_field, seq_len=spec.seq_len,
            eos_id=int(eos),
        )
    docs = tokenize_texts(tokenizer, iter_texts(spec))
    if spec.packing:
        blocks = pack_tokens(docs, seq_len=spec.seq_len, eos_id=int(eos))
        if len(blocks) == 0:
            raise ConfigError(
                f"data.source: fewer than {spec.seq_len} tokens in {spec.source!r}",
                hint="add text or lower data.seq_len",
            )
        return PackedDataset(blocks)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ds = PaddedDataset(docs, seq_len=spec.seq_len, pad_id=int(pad), eos_id=int(eos))
    if len(ds) == 0:
        raise ConfigError(f"data.source: no documents in {spec.source!r}")
    return ds
