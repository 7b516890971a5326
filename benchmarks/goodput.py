"""Goodput of sessions that end at a fixed deadline: how much of a session trains.

One job trains a tiny GPT-2 (2 layers, 128 wide, built from a config; batch 8 x 64 tokens,
AdamW, one thread) with the Session API through ``colabjob.session(...)`` on local storage,
over ``RUNS`` simulated sessions of ``SESSION_S`` seconds each. A session is a child process
whose ``session_started_at`` is the moment the parent starts it and whose ``budget`` is
``SESSION_S``: it must stop on its own with its final checkpoint committed before the
deadline, because the parent SIGKILLs it at the deadline (the VM vanishing). Checkpoints are
written every ``CHECKPOINT_EVERY_S`` seconds in the background plus the final one; the next
session resumes from the newest committed checkpoint.

Per session: ``startup`` (session start to the first step: interpreter, imports, model,
restore; reported, not counted), ``goodput`` = time in training steps (batch, forward,
backward, optimizer; not ``s.step()``) / (deadline - first step), ``steps_lost`` = the last
optimizer step executed - the newest committed step when the session ends or is killed
(and the next session must resume from that step), and the final commit's distance from the
deadline. A deadline miss: the final checkpoint was not committed, or the segment was not
closed (record SUSPENDED, lease released) before the deadline; a child still in the
interpreter's own exit at the deadline (about a second with torch loaded) is killed there
but has nothing left to lose; that is counted apart (``killed_in_exit``). Also printed:
where the rest of the window went (``s.step()`` calls including checkpoint snapshots, the
final commit, the unused tail before the deadline) and the goodput at the median step's
speed (training steps slowed by a background upload count as steps in the main figure).

Scaling. The session is ~700x shorter than a 12 h Colab session, so the one time constant
of the stop rule that is not measured is scaled down too: ``margin`` (a ``session()``
parameter) is ``MARGIN_S`` instead of 3 min. Everything else is the shipped default: before
the first step the rule reserves no step time (nothing new could be saved by stopping yet),
after it the measured warm-up step, then the p95 of the measured steps; before the first
checkpoint is measured, the save is guessed from the checkpoint's size (weights + optimizer
state, told by the Session) at guessed throughputs. Reports only (targets: goodput >= 0.97,
0 steps lost, 0 deadline misses).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SESSION_S, RUNS = 60.0, 3
MARGIN_S = 1.0  # stands for the default 3 min of a 12 h session (0.4% there, 1.7% here)
CHECKPOINT_EVERY_S = 10.0
LEASE_TTL_S = 5.0  # a killed session's lease is taken over after this
LAYERS, WIDTH, HEADS, VOCAB, SEQ, BATCH, ROWS = 2, 128, 4, 1024, 64, 8, 4096

# slots of the array the child shares with the parent (it survives a SIGKILL)
FIRST_AT, USEFUL, LAST_STEP, RESUMED_AT, COMMIT_AT, CLOSED_AT = range(6)


# ---- the child: one session -----------------------------------------------------------------


def session_main(job: str, started_at: float, shared: Any, out: str) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    import colabjob
    from colabjob.jobs.data import make_loader

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=LAYERS,
        n_embd=WIDTH,
        n_head=HEADS,
        n_positions=SEQ,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    loader = make_loader(data, batch_size=BATCH, seed=0)
    said: list[str] = []

    def log(message: str) -> None:  # keep the checkpoint and stop lines, not the metrics
        if not message.startswith("step="):
            said.append(message)

    step_s: list[float] = []
    call_s: list[float] = []
    commits: set[int] = set()
    with colabjob.session(
        job,
        budget=SESSION_S,
        session_started_at=started_at,
        platform="local",
        margin=MARGIN_S,
        every_minutes=CHECKPOINT_EVERY_S / 60,
        lease_ttl=LEASE_TTL_S,
        force=True,
        log=log,
    ) as s:
        s.track(model=model, optimizer=opt, loader=loader)
        shared[RESUMED_AT] = s.first_step
        t0 = time.perf_counter()
        shared[FIRST_AT] = time.time()
        for batch in s.batches():
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            step_s.append(t1 - t0)
            shared[USEFUL] += t1 - t0
            shared[LAST_STEP] = s.global_step + 1  # executed; s.step() has not counted it yet
            stop = s.step(loss=loss.detach())
            t0 = time.perf_counter()
            call_s.append(t0 - t1)
            if s.committed_step is not None:
                commits.add(s.committed_step)
            if stop:
                shared[COMMIT_AT] = time.time()
                break
    shared[CLOSED_AT] = time.time()  # record closed, lease released, store flushed
    result = {
        "stop_reason": s.stop_reason,
        "steps": len(step_s),
        "step_p50": statistics.median(step_s) if step_s else 0.0,
        "step_p95": sorted(step_s)[int(0.95 * (len(step_s) - 1))] if step_s else 0.0,
        "calls_s": sum(call_s[:-1]),  # every s.step() but the last (the final commit)
        "final_s": call_s[-1] if call_s else 0.0,
        "checkpoints": len(commits - {s.first_step}),
        "exited_at": time.time(),
        "log": said,
    }
    Path(out).write_text(json.dumps(result))


# ---- the parent: sessions, deadlines, kills ------------------------------------------------


def run_session(job: str, tmp: Path, index: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    shared = ctx.Array("d", 6, lock=False)
    shared[COMMIT_AT] = shared[FIRST_AT] = shared[CLOSED_AT] = float("nan")
    out = tmp / f"session-{index}.json"
    started_at = time.time()
    deadline = started_at + SESSION_S
    child = ctx.Process(target=session_main, args=(job, started_at, shared, str(out)))
    child.start()
    child.join(max(0.0, deadline - time.time()))
    killed = child.is_alive()
    if killed:
        child.kill()
        child.join()
    got: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    return {
        "started_at": started_at,
        "deadline": deadline,
        "killed": killed,
        "first_at": shared[FIRST_AT],
        "useful": shared[USEFUL],
        "last_step": int(shared[LAST_STEP]),
        "resumed_at": int(shared[RESUMED_AT]),
        "commit_at": shared[COMMIT_AT],
        "closed_at": shared[CLOSED_AT],
        **got,
    }


def committed_step(job: str) -> int:
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.store import open_store

    info = CheckpointStore(open_store(job)).latest()
    return 0 if info is None else info.step


def summarise(name: str, r: dict[str, Any], committed: int, expected_resume: int) -> None:
    """Add the derived figures to ``r`` and print the session's lines."""
    began = not math.isnan(r["first_at"])
    startup = (r["first_at"] if began else r["deadline"]) - r["started_at"]
    window = r["deadline"] - r["first_at"] if began else 0.0
    goodput = r["useful"] / window if window > 0 else 0.0
    steady = r.get("steps", 0) * r.get("step_p50", 0.0) / window if window > 0 else 0.0
    margin = None if math.isnan(r["commit_at"]) else r["deadline"] - r["commit_at"]
    # steps done after the newest commit, plus any redone because a resume started earlier
    lost = max(0, r["last_step"] - committed) + abs(r["resumed_at"] - expected_resume)
    closed = None if math.isnan(r["closed_at"]) else r["deadline"] - r["closed_at"]
    miss = (margin < 0 if margin is not None else r["last_step"] > 0) or closed is None or (
        closed < 0
    )
    in_exit = r["killed"] and closed is not None and closed >= 0
    r.update(
        startup=startup, window=window, lost=lost, margin=margin, miss=miss, in_exit=in_exit
    )
    print(
        f"{name}: steps {r['resumed_at']}->{r['last_step']}, committed {committed} "
        f"(resumed at {r['resumed_at']}, expected {expected_resume}), "
        f"stop={r.get('stop_reason', 'killed')}, startup {startup:.2f}s, goodput {goodput:.4f} "
        f"(at the median step's speed {steady:.4f}), steps lost {lost}, final commit "
        f"{'none' if margin is None else f'{margin:.2f}s'} before the deadline, segment "
        f"closed {'never' if closed is None else f'{closed:.2f}s before it'}"
        f"{' (then killed at the deadline in the interpreter exit)' if in_exit else ''}"
        f"{', KILLED at the deadline' if r['killed'] and not in_exit else ''}"
    )
    if window > 0 and r.get("steps"):
        tail = margin if margin is not None else 0.0
        other = window - r["useful"] - r["calls_s"] - r["final_s"] - tail
        print(
            f"    window {window:.2f}s = steps {r['useful']:.2f}s + s.step() calls "
            f"{r['calls_s']:.3f}s ({r['checkpoints']} background checkpoints) + final commit "
            f"{r['final_s']:.3f}s + unused tail {tail:.2f}s + other {other:.3f}s; "
            f"step p50 {r['step_p50'] * 1e3:.1f} ms, p95 {r['step_p95'] * 1e3:.1f} ms"
        )
    for line in r.get("log", []):
        if "stopping" in line or "left" in line:
            print(f"    colabjob: {line}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="colabjob-bench-goodput-") as tmp_name:
        tmp = Path(tmp_name)
        job = str(tmp / "job")
        runs: list[dict[str, Any]] = []
        expected = 0
        for i in range(RUNS):
            r = run_session(job, tmp, i + 1)
            committed = committed_step(job)
            summarise(f"session {i + 1}", r, committed, expected)
            runs.append(r)
            expected = committed

    windows = sum(r["window"] for r in runs)
    margins = [r["margin"] for r in runs if r["margin"] is not None]
    result = {
        "bench": "goodput",
        "goodput": round(sum(r["useful"] for r in runs) / windows, 4) if windows else 0.0,
        "steps_lost": sum(r["lost"] for r in runs),
        "deadline_misses": sum(r["miss"] for r in runs),
        "runs": len(runs),
        "startup_s": round(statistics.mean(r["startup"] for r in runs), 3),
        "final_commit_margin_s": round(min(margins), 3) if margins else None,
        "killed_in_exit": sum(r["in_exit"] for r in runs),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
