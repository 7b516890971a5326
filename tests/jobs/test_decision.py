"""The one step-boundary decision (``colabjob.jobs.decision``) and the one committer, as both
training paths use them.

A table of every case ``decide`` is asked about (deadline, signal, preemption, stop request,
max_steps, every_steps, every_minutes, a commit in flight, several ranks); then a Session and
an HF Trainer whose budget stops exactly at ``max_steps`` both end ``completed`` with a
committed final checkpoint, and the manifest ``meta`` of both paths' checkpoints holds
``epoch`` and ``samples_seen``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from colabjob.jobs.context import SegmentContext
from colabjob.jobs.decision import (
    STOP_CODES,
    Decision,
    Vote,
    combine,
    decide,
    decide_agreed,
    save_wanted,
)
from colabjob.jobs.policy import StopPolicy, StopReason

from .kind_fixtures import StopAfter, make_ctx, tiny_model_dir, write_text_data

B, S, P, R, C = (
    StopReason.BUDGET,
    StopReason.SIGNAL,
    StopReason.PREEMPTION,
    StopReason.STOP_REQUEST,
    StopReason.COMPLETED,
)


def _go(*, save: bool = False, deferred: bool = False, busy: bool = False) -> Decision:
    return Decision(stop=False, save=save, reason=None, deferred=deferred, busy=busy)


def _stop(reason: StopReason, *, emergency: bool = False, busy: bool = False) -> Decision:
    return Decision(stop=True, save=True, reason=reason, emergency=emergency, busy=busy)


CASES: list[tuple[str, Vote, int, int | None, bool, Decision]] = [
    # name, vote, step, max_steps, complete (the last epoch ended), expected
    ("nothing", Vote(), 3, 10, False, _go()),
    ("no max_steps", Vote(), 10**6, None, False, _go()),
    ("deadline", Vote(reason=B), 3, 10, False, _stop(B)),
    ("signal", Vote(reason=S), 3, 10, False, _stop(S)),
    ("stop request", Vote(reason=R), 3, 10, False, _stop(R)),
    ("preemption", Vote(reason=P, emergency=True), 3, 10, False, _stop(P, emergency=True)),
    ("preemption flag only", Vote(reason=P), 3, 10, False, _stop(P, emergency=True)),
    ("max_steps", Vote(), 10, 10, False, _stop(C)),
    ("past max_steps", Vote(), 11, 10, False, _stop(C)),
    ("end of the last epoch", Vote(), 4, None, True, _stop(C)),
    # the last step: completed wins over whatever else asked for a stop there
    ("deadline at max_steps", Vote(reason=B), 10, 10, False, _stop(C)),
    ("signal at max_steps", Vote(reason=S), 10, 10, False, _stop(C)),
    ("request at max_steps", Vote(reason=R), 10, 10, False, _stop(C)),
    ("preempted at max_steps", Vote(reason=P, emergency=True), 10, 10, False,
     _stop(C, emergency=True)),
    ("deadline at the last epoch's end", Vote(reason=B), 4, None, True, _stop(C)),
    # periodic checkpoints (every_steps / every_minutes / a retry: Vote.save) and one in flight
    ("save due", Vote(save=True), 4, 10, False, _go(save=True)),
    ("save due, commit in flight", Vote(save=True, busy=True), 4, 10, False,
     _go(deferred=True, busy=True)),
    ("commit in flight, nothing due", Vote(busy=True), 4, 10, False, _go(busy=True)),
    ("stop while a commit is in flight", Vote(reason=B, busy=True), 4, 10, False,
     _stop(B, busy=True)),
    ("save due at a stop", Vote(reason=S, save=True), 4, 10, False, _stop(S)),
    ("save due at max_steps", Vote(save=True), 10, 10, False, _stop(C)),
]


@pytest.mark.parametrize(
    ("vote", "step", "max_steps", "complete", "want"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decide(vote: Vote, step: int, max_steps: int | None, complete: bool, want: Decision):
    assert decide(vote, step=step, max_steps=max_steps, complete=complete) == want


SAVES = [
    # step, every_steps, checkpoint_due (every_minutes / the deadline's last save), retry, want
    (4, 2, False, False, True),  # every_steps
    (5, 2, False, False, False),
    (5, None, False, False, False),
    (5, None, True, False, True),  # every_minutes: the policy says one is due
    (5, 2, False, True, True),  # a failed or deferred one is retried
]


@pytest.mark.parametrize(("step", "every", "due", "retry", "want"), SAVES)
def test_save_wanted(step: int, every: int | None, due: bool, retry: bool, want: bool) -> None:
    assert save_wanted(step=step, every_steps=every, checkpoint_due=due, retry=retry) is want


RANKS = [
    # each rank's vote -> the agreed one
    ([Vote(), Vote()], Vote()),
    ([Vote(reason=B), Vote()], Vote(reason=B)),  # any rank's stop stops all
    ([Vote(), Vote(reason=S)], Vote(reason=S)),
    ([Vote(reason=B), Vote(reason=S), Vote(reason=R)], Vote(reason=S)),
    ([Vote(reason=S), Vote(reason=P, emergency=True)], Vote(reason=P, emergency=True)),
    ([Vote(reason=C), Vote(reason=P)], Vote(reason=C)),
    ([Vote(save=True), Vote()], Vote(save=True)),  # any rank's checkpoint wish
    ([Vote(busy=True), Vote(save=True)], Vote(save=True, busy=True)),  # rank 0 uploads
]


@pytest.mark.parametrize(("votes", "want"), RANKS)
def test_ranks_combine_their_votes(votes: list[Vote], want: Vote) -> None:
    assert combine(votes) == want
    assert Vote.from_codes(want.codes()) == want  # what travels through the all-reduce


def test_every_rank_decides_the_same_from_the_agreed_vote() -> None:
    class Fold:  # the all-reduce over two ranks, one of which is this vote's
        def __init__(self, other: Vote) -> None:
            self.other = other

        def agree(self, vote: Vote) -> Vote:
            return combine([vote, self.other])

    rank1 = Vote(reason=B)  # rank 1's budget ran out at the last step
    d0 = decide_agreed(Fold(rank1), Vote(save=True), step=10, max_steps=10)
    d1 = decide_agreed(Fold(Vote(save=True)), rank1, step=10, max_steps=10)
    assert d0 == d1 == _stop(C)
    d0 = decide_agreed(Fold(Vote(busy=True)), Vote(save=True), step=4, max_steps=10)
    d1 = decide_agreed(Fold(Vote(save=True)), Vote(busy=True), step=4, max_steps=10)
    assert d0 == d1 == _go(deferred=True, busy=True)  # rank 0's upload defers everyone's save
    assert decide_agreed(None, Vote(reason=R), step=1, max_steps=None) == _stop(R)


def test_stop_codes_rank_every_policy_reason() -> None:
    assert set(STOP_CODES) == set(StopReason) - {StopReason.CRASH}
    assert max(STOP_CODES, key=STOP_CODES.__getitem__) is StopReason.COMPLETED


def test_a_vote_asks_the_policy() -> None:
    class Due(StopPolicy):
        emergency = True  # type: ignore[assignment]

        def should_stop(self) -> StopReason | None:
            return StopReason.PREEMPTION

        def checkpoint_due(self) -> bool:
            return True

    vote = Vote.ask(Due(), step=3, every_steps=None, retry=False, busy=True)
    assert vote == Vote(reason=P, save=True, busy=True, emergency=True)
    assert Vote.ask(StopPolicy(), step=3, every_steps=3, retry=False, busy=False) == Vote(
        save=True
    )


def test_decision_needs_a_reason_exactly_when_it_stops() -> None:
    with pytest.raises(ValueError, match="reason"):
        Decision(stop=True, save=True, reason=None)
    with pytest.raises(ValueError, match="reason"):
        Decision(stop=False, save=False, reason=B)


def test_the_decision_imports_no_torch() -> None:
    code = "import sys, colabjob.jobs.decision; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- both paths: the budget stops exactly at max_steps ---------------------------------------


def _manifest(ctx: SegmentContext) -> dict[str, Any]:
    """The newest committed checkpoint's manifest.json, as stored."""
    info = ctx.checkpoints.latest()
    assert info is not None
    doc = json.loads(ctx.checkpoints.store.read_bytes(info.key("manifest.json")))
    assert doc["step"] == info.step
    return dict(doc)


def test_session_budget_stop_at_max_steps_completes(tmp_path: Path) -> None:
    from colabjob.jobs.session import Session

    from .equiv_child import build, train

    ctx = make_ctx(tmp_path, StopAfter(6), max_steps=6, every_steps=4)
    objs = build("plain", init_seed=0, total=12)
    with Session(ctx) as s:
        objs.track(s)
        train(s, objs)
    out = s.outcome
    assert out is not None and out.stop_reason is C and out.completed and out.last_step == 6
    assert out.checkpoint_step == 6
    meta = _manifest(ctx)["meta"]
    assert meta["epoch"] == s.epoch and meta["samples_seen"] == s.counters.samples_seen > 0


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-assets")
    data = write_text_data(root / "data", docs=30, words=40)
    return {"data": data, "model": tiny_model_dir(root / "model", data)}


def test_hf_budget_stop_at_max_steps_completes(assets: dict[str, Path], tmp_path: Path) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from colabjob.jobs.hf.trainer import make_resumable

    g = torch.Generator().manual_seed(3)
    rows = {"input_ids": torch.randint(0, 200, (48, 16), generator=g).tolist()}
    rows["labels"] = rows["input_ids"]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6,
        learning_rate=2e-3, save_strategy="no", report_to="none", use_cpu=True, seed=4,
        disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows))
    ctx = make_ctx(tmp_path / "job", StopAfter(6), every_steps=4)
    make_resumable(trainer, ctx).train()
    out = trainer.colabjob_outcome  # type: ignore[attr-defined]
    assert out is not None and out.stop_reason is C and out.completed and out.last_step == 6
    assert out.checkpoint_step == 6
    meta = _manifest(ctx)["meta"]
    assert meta["epoch"] == 0 and meta["samples_seen"] == 6 * 4 and meta["hf"] is True
