"""Data position tests: resumed loaders continue with exactly the next sample, in O(1).

Sequences are compared index by index against one uninterrupted iteration, with resume
points mid-epoch, on the last batch of an epoch and between epochs; seeks are measured by
counting dataset reads, never by timing.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from colabjob.errors import ConfigError, GeometryChangedError, ResumeError
from colabjob.jobs.data import (
    Geometry,
    ResumableIterable,
    ResumableSampler,
    check_geometry,
    make_loader,
    sample_rng,
)

from .helpers import CountingDataset, NoisyDataset, hf_iterable


def _indices(batch: Any) -> list[int]:
    return (batch["index"] if isinstance(batch, dict) else batch).tolist()


def _take(loader: Any, n_batches: int) -> list[list[int]]:
    """``n_batches`` entries: batches, and [] where an epoch ended."""
    out: list[list[int]] = []
    while True:
        for batch in loader:
            out.append(_indices(batch))
            if len(out) == n_batches:
                return out
        out.append([])  # end of an epoch
        if len(out) == n_batches:
            return out


def _flatten(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


@pytest.mark.parametrize(
    ("num_workers", "drop_last", "cut"),
    [
        (0, False, 3),
        (0, False, 4),
        (0, False, 6),
        (0, True, 2),
        (0, True, 5),
        (2, False, 3),
        (2, False, 6),
        (2, True, 2),
    ],
)
def test_loader_resume_continues_exactly(num_workers: int, drop_last: bool, cut: int) -> None:
    """10 samples, batch 4: epochs of 3 batches (2 with drop_last), then an end-of-epoch
    marker. Cut ``cut`` entries in: on an epoch's last batch, between epochs, mid-epoch."""

    def loader() -> Any:
        return make_loader(
            NoisyDataset(10), batch_size=4, seed=3, num_workers=num_workers, drop_last=drop_last
        )

    straight = _take(loader(), 12)
    first = loader()
    head = _take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # map-style state is plain JSON
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + _take(resumed, 12 - cut) == straight
    assert sorted(_flatten(straight[:4])) == list(range(10)) or drop_last


def test_state_between_epochs_starts_next_epoch() -> None:
    ld = make_loader(NoisyDataset(8), batch_size=4, seed=3)
    epoch0 = [_indices(b) for b in ld]
    state = ld.state_dict()  # after StopIteration: the epoch is over
    assert state["epoch"] == 1 and state["sampler"]["offset"] == 0
    resumed = make_loader(NoisyDataset(8), batch_size=4, seed=3)
    resumed.load_state_dict(state)
    epoch1 = [_indices(b) for b in resumed]
    assert resumed.dataset.epoch == 1  # set_epoch() was called for per-sample randomness
    assert len(epoch1) == 2 and epoch1 != epoch0 and sorted(_flatten(epoch1)) == list(range(8))
    expected = [_indices(b) for b in ld]
    assert epoch1 == expected


def test_resume_on_last_batch_ends_the_epoch_first() -> None:
    """Saved right after the epoch's last batch (before StopIteration): the resumed loader
    first ends that epoch, as the uninterrupted one does, so epoch-end code runs once."""
    ld = make_loader(NoisyDataset(8), batch_size=4, seed=3)
    it = iter(ld)
    next(it), next(it)
    state = ld.state_dict()
    resumed = make_loader(NoisyDataset(8), batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert list(resumed) == [] and resumed.epoch == 0
    assert len(list(resumed)) == 2 and resumed.epoch == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_again_continues_after_the_yielded(num_workers: int) -> None:
    """Breaking out of the loop and iterating again skips nothing, even though workers
    had prefetched past the break."""

    def loader() -> Any:
        return make_loader(NoisyDataset(20), batch_size=2, seed=4, num_workers=num_workers)

    straight = _take(loader(), 12)
    ld = loader()
    head = _take(ld, 2)
    assert head + _take(ld, 10) == straight
    src = _Source(20)
    it_ld = make_loader(ResumableIterable(src.open_at), batch_size=2, seed=4)
    assert _take(it_ld, 2) + _take(it_ld, 10) == _take(
        make_loader(ResumableIterable(_Source(20).open_at), batch_size=2, seed=4), 12
    )


def test_iterable_without_state_is_refused() -> None:
    class Plain(torch.utils.data.IterableDataset[int]):
        def __iter__(self) -> Iterator[int]:
            return iter(range(3))

    with pytest.raises(ConfigError, match="ResumableIterable"):
        make_loader(Plain(), batch_size=2, seed=0)


def test_geometry_change_adapts_in_samples() -> None:
    """A map-style position is in samples: it loads into a loader with another batch size
    and worker count and continues with the next unseen sample."""
    first = make_loader(NoisyDataset(24), batch_size=4, seed=5)
    seen = _flatten(_take(first, 3))
    order = ResumableSampler(NoisyDataset(24), seed=5).order(0).tolist()
    bigger = make_loader(NoisyDataset(24), batch_size=6, seed=5, num_workers=2)
    bigger.load_state_dict(first.state_dict())
    batch = _indices(next(iter(bigger)))
    assert seen == order[:12] and batch == order[12:18]


def test_sampler_epochs_and_state() -> None:
    s = ResumableSampler(range(50), seed=1)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == sorted(e1) == list(range(50)) and e0 != e1
    s2 = ResumableSampler(range(50), seed=1)
    s2.set_epoch(1)
    assert list(s2) == e1  # same (seed, epoch), same order
    it = iter(s2 := ResumableSampler(range(50), seed=1))
    head = [next(it) for _ in range(7)]
    s3 = ResumableSampler(range(50), seed=1)
    s3.load_state_dict(s2.state_dict())
    assert head + list(s3) == e0
    assert list(ResumableSampler(range(5), seed=1, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_refuses_changed_dataset_or_seed() -> None:
    state = ResumableSampler(range(50), seed=1).state_dict()
    with pytest.raises(ResumeError, match="50 samples"):
        ResumableSampler(range(51), seed=1).load_state_dict(state)
    with pytest.raises(ResumeError, match="seed"):
        ResumableSampler(range(50), seed=2).load_state_dict(state)


@pytest.mark.parametrize("position", [10, 100_000])
def test_seek_reads_only_the_next_batch(position: int) -> None:
    """O(1) resume: the reads after loading a position do not grow with the position."""
    data = CountingDataset(200_000)
    state = make_loader(data, batch_size=8, seed=1).state_dict()
    state["sampler"]["offset"] = position
    loader = make_loader(data, batch_size=8, seed=1)
    loader.load_state_dict(state)
    batch = next(iter(loader))
    order = ResumableSampler(data, seed=1).order(0)
    assert batch.tolist() == order[position : position + 8].tolist()
    assert data.calls == 8


class _Source:
    """A stream of ints that can be opened at any offset; counts items produced."""

    def __init__(self, n: int) -> None:
        self.n, self.produced, self.opened_at = n, 0, []

    def open_at(self, offset: int) -> Iterator[int]:
        self.opened_at.append(offset)
        for i in range(offset, self.n):
            self.produced += 1
            yield i


@pytest.mark.parametrize("position", [10, 100_000])
def test_resumable_iterable_seeks_in_o1(position: int) -> None:
    src = _Source(200_000)
    loader = make_loader(ResumableIterable(src.open_at), batch_size=8, seed=1)
    state = loader.state_dict()
    state["loader"] = {}
    loader.load_state_dict(state)
    loader.dataset.load_state_dict({"epoch": 0, "position": position})
    assert next(iter(loader)).tolist() == list(range(position, position + 8))
    assert src.produced == 8 and src.opened_at == [position]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_iterable_resume_matches(num_workers: int) -> None:
    def loader() -> Any:
        return make_loader(
            ResumableIterable(_Source(14).open_at), batch_size=3, seed=1, num_workers=num_workers
        )

    straight = _take(loader(), 8)
    first = loader()
    head = _take(first, 3)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert head + _take(resumed, 5) == straight


def test_hf_iterable_resume_with_workers() -> None:
    def loader(workers: int) -> Any:
        return make_loader(hf_iterable(20, num_shards=4), batch_size=3, seed=1, num_workers=workers)

    straight = _take(loader(2), 9)
    first = loader(2)
    head = _take(first, 4)
    state = first.state_dict()
    resumed = loader(2)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 5) == straight
    with pytest.raises(ResumeError, match="num_workers=2"):
        loader(0).load_state_dict(state)


def test_check_geometry() -> None:
    saved = Geometry(batch_size=8, grad_accum=4)
    assert check_geometry(saved, Geometry(batch_size=8, grad_accum=4), allow_change=False) == ()
    with pytest.raises(GeometryChangedError) as info:
        check_geometry(
            saved, Geometry(batch_size=8, grad_accum=2, world_size=2), allow_change=False
        )
    msg = str(info.value)
    assert "grad_accum 4 -> 2" in msg and "world_size 1 -> 2" in msg and "batch_size" not in msg
    assert "--allow-geometry-change" in msg
    with pytest.warns(UserWarning):
        changed = check_geometry(saved, Geometry(batch_size=16, grad_accum=4), allow_change=True)
    assert changed == ("batch_size",)
    with pytest.raises(ConfigError):
        Geometry(batch_size=0)


def test_make_loader_rejects_shuffled_iterable_and_own_sampler() -> None:
    with pytest.raises(ConfigError, match="IterableDataset"):
        make_loader(hf_iterable(4), batch_size=2, seed=0, shuffle=True)
    with pytest.raises(ConfigError, match="sampler"):
        make_loader(NoisyDataset(4), batch_size=2, seed=0, sampler=range(4))


def test_sample_rng_is_a_pure_function() -> None:
    a = torch.rand(4, generator=sample_rng(1, 2, 3))
    assert torch.equal(a, torch.rand(4, generator=sample_rng(1, 2, 3)))
    others = [sample_rng(1, 2, 4), sample_rng(1, 3, 3), sample_rng(2, 2, 3)]
    assert all(not torch.equal(a, torch.rand(4, generator=g)) for g in others)


def test_worker_seeds_follow_seed_and_epoch() -> None:
    """Workers' global torch RNG is seeded from (seed, epoch): the same epoch gives the same
    draws in a new loader; another epoch gives others."""

    class Draw(torch.utils.data.Dataset[torch.Tensor]):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.rand(())

    def draws(loader: Any) -> list[float]:
        return list(itertools.chain.from_iterable(b.tolist() for b in loader))

    def loader(seed: int = 9) -> Any:
        return make_loader(Draw(), batch_size=2, seed=seed, num_workers=2)

    a = loader()
    epoch0 = draws(a)
    state = a.state_dict()  # between epochs 0 and 1
    epoch1 = draws(a)
    assert epoch0 == draws(loader()) and epoch1 != epoch0
    assert draws(loader(seed=10)) != epoch0
    resumed = loader()
    resumed.load_state_dict(state)
    assert draws(resumed) == epoch1
