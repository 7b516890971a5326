"""ShuffledStream and ShardedStream: a buffer-shuffled stream resumes exactly in O(buffer).

In-process checks through ``make_loader`` (0 and 2 loader workers) with the state passed
through the checkpoint codec and JSON, as a checkpoint stores it: the stream resumed after
any batch continues exactly like an uninterrupted one, across epochs; each epoch is a
shuffled permutation of the source; a resume reads O(buffer) items of the source however
far in it stood; the saved state's size beyond an unshuffled stream's is bounded by the
buffer. The SIGKILL runs are in ``test_equivalence.py`` (``shuffled``, ``shuffled-workers``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import save

from colabjob.errors import CheckpointError, ConfigError, ResumeError
from colabjob.jobs.data import ResumableIterable, ShardedStream, ShuffledStream, make_loader
from colabjob.jobs.state.codec import decode, encode

from .helpers import hf_iterable

N, BUFFER, BATCH = 40, 8, 4  # 10 batches per epoch
OVERHEAD_PER_TENSOR = 160  # bytes: its key and marker in the JSON, its safetensors header entry


def _item(k: int) -> dict[str, Any]:
    return {"i": torch.tensor(k), "v": torch.full((3,), float(k))}


def _counting_source(n: int, opened: list[int], read: list[int]) -> ResumableIterable[Any]:
    def open_at(offset: int) -> Iterator[dict[str, Any]]:
        opened.append(offset)
        for k in range(offset, n):
            read.append(k)
            yield _item(k)

    return ResumableIterable(open_at)


def _rows(shard: range, row: int) -> Iterator[dict[str, Any]]:
    return (_item(k) for k in shard[row:])


def _sources() -> dict[str, Callable[[], Any]]:
    return {
        "resumable": lambda: _counting_source(N, [], []),
        "shards": lambda: ShardedStream([range(s, N, 5) for s in range(5)], _rows, seed=3),
        "hf": lambda: hf_iterable(N, num_shards=4).rename_column("index", "i"),
    }


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def _checkpointed(state: dict[str, Any]) -> dict[str, Any]:
    """The state as a checkpoint returns it: codec tree through JSON, tensors cloned."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(encode(state, "data", tensors)))
    return decode(tree, {k: v.clone() for k, v in tensors.items()})


def _take(source: Any, workers: int, batches: int, state: dict[str, Any] | None = None):
    stream = ShuffledStream(source, buffer_size=BUFFER, seed=5)
    loader = make_loader(stream, batch_size=BATCH, seed=1, num_workers=workers)
    if state is not None:
        loader.load_state_dict(state)
    out: list[list[int]] = []
    it = iter(loader)
    while len(out) < batches:
        batch = next(it, None)
        if batch is None:  # the epoch ended: the next iter() starts the next one
            it = iter(loader)
            continue
        out.append(batch["i"].tolist())
    return out, loader


@pytest.mark.parametrize("kind", ["resumable", "shards", "hf"])
def test_resume_after_any_batch_continues_exactly(kind: str):
    make = _sources()[kind]
    straight, _ = _take(make(), 0, 25)  # two and a half epochs
    for k in range(1, 25, 3):  # across the epoch boundaries (10 and 20) too
        head, loader = _take(make(), 0, k)
        tail, _ = _take(make(), 0, 25 - k, _checkpointed(loader.state_dict()))
        assert head + tail == straight, (kind, k)
    epochs = [sorted(_flat(straight[e * 10 : e * 10 + 10])) for e in range(2)]
    assert epochs == [list(range(N))] * 2  # each epoch: every item once
    assert _flat(straight[:10]) != list(range(N))  # shuffled
    assert straight[:10] != straight[10:20]  # and differently each epoch


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "hf"])
def test_two_workers_resume_exactly(kind: str):
    """Each worker keeps its own buffer over its share; its state comes back per worker."""
    make = _sources()[kind]
    straight, _ = _take(make(), 2, 25)
    for k in (3, 12):
        head, loader = _take(make(), 2, k)
        tail, _ = _take(make(), 2, 25 - k, _checkpointed(loader.state_dict()))
        assert head + tail == straight, (kind, k)
    assert sorted(_flat(straight[:10])) == list(range(N))


def test_shard_order_is_reshuffled_per_epoch_from_the_seed():
    stream = ShardedStream(list(range(12)), lambda s, row: iter([s]), seed=9)
    orders = [stream.order(e) for e in range(3)]
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert ShardedStream(list(range(12)), lambda s, r: iter([s]), seed=9).order(1) == orders[1]
    split = [ShardedStream(list(range(12)), lambda s, r: iter([s]), seed=9, rank=r, world_size=3)
             for r in range(3)]  # fmt: skip
    read = [list(s) for s in split]
    assert sorted(_flat(read)) == list(range(12)) and read[0] == orders[0][0::3]


def test_a_resume_far_in_reads_only_the_buffer_not_the_position():
    """At item 10^5 of a stream, the resume opens the source once at its position and reads
    the next batch's items; the buffer comes from the checkpoint."""
    opened: list[int] = []
    read: list[int] = []
    far = 100_000
    stream = ShuffledStream(_counting_source(10**9, opened, read), buffer_size=BUFFER, seed=5)
    it = iter(stream)
    for _ in range(far):
        next(it)
    state = _checkpointed(stream.state_dict())
    want = [next(it)["i"].item() for _ in range(BATCH)]
    opened.clear()
    read.clear()
    again = ShuffledStream(_counting_source(10**9, opened, read), buffer_size=BUFFER, seed=5)
    again.load_state_dict(state)
    got = [x["i"].item() for x, _ in zip(again, range(BATCH), strict=False)]
    assert got == want
    assert opened == [far + BUFFER] and len(read) <= BATCH + 1


def test_checkpoint_extra_size_is_bounded_by_the_buffer():
    """What a shuffled stream adds to the data state, as a checkpoint writes it (a JSON tree
    and a safetensors file), is the buffered samples plus a bounded overhead per buffered
    tensor (its name in both): independent of the stream's position."""

    def saved_bytes(state: dict[str, Any]) -> int:
        tensors: dict[str, torch.Tensor] = {}
        tree = encode(state, "data", tensors)
        return len(json.dumps(tree)) + len(save(tensors))

    size, sample = 64, _item(0)
    samples_bytes = size * sum(t.nbytes for t in sample.values())
    extras = []
    for far in (10, 10_000):
        plain = _counting_source(10**9, [], [])
        plain.position = far
        stream = ShuffledStream(_counting_source(10**9, [], []), buffer_size=size, seed=5)
        it = iter(stream)
        for _ in range(far):
            next(it)
        extras.append(saved_bytes(stream.state_dict()) - saved_bytes(plain.state_dict()))
    overhead = size * len(sample) * OVERHEAD_PER_TENSOR + 1024
    assert all(samples_bytes < e <= samples_bytes + overhead for e in extras), extras
    assert abs(extras[1] - extras[0]) < 64, extras  # the position's digits, not the data


def test_refusals_say_what_to_do():
    with pytest.raises(ConfigError, match=r"before \.shuffle"):
        ShuffledStream(hf_iterable(8).shuffle(seed=1, buffer_size=4), buffer_size=4, seed=1)
    with pytest.raises(ConfigError, match="state_dict"):
        ShuffledStream(iter(range(4)), buffer_size=4, seed=1)
    with pytest.raises(ConfigError, match="buffer_size"):
        ShuffledStream(_counting_source(4, [], []), buffer_size=0, seed=1)
    state = ShuffledStream(_counting_source(4, [], []), buffer_size=4, seed=1).state_dict()
    for other in (dict(buffer_size=5, seed=1), dict(buffer_size=4, seed=2)):
        with pytest.raises(ResumeError, match="original shuffle seed"):
            ShuffledStream(_counting_source(4, [], []), **other).load_state_dict(state)
    with pytest.raises(CheckpointError):
        ShuffledStream(_counting_source(4, [], []), buffer_size=4, seed=1).load_state_dict({})
    shards = ShardedStream([1, 2], lambda s, r: iter([s]), seed=1)
    with pytest.raises(ResumeError, match="same list of shards"):
        ShardedStream([1, 2, 3], lambda s, r: iter([s]), seed=1).load_state_dict(
            shards.state_dict()
        )
