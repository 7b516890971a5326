"""What a dead notification endpoint costs a training loop (issue 14): nothing measurable.

The overhead benchmark's small MLP (a step of a few ms, one thread) trains in three
``colabjob.session`` loops that differ only in their notifications:

- ``off`` and ``off_twin``: none (the twin's ratio to ``off`` is this machine's noise floor);
- ``hanging``: one apprise ``json://`` URL whose endpoint accepts the connection and never
  answers (the worst case: the sender thread sits in a socket read until its timeout),
  and a message is queued to it every chunk of steps, so the sender is always stuck.

The loops advance in alternating chunks of 20 steps (rotating order); each ratio is the
median over rounds of the per-round time ratio. Also measured: how long closing a segment
takes with a hanging endpoint (bounded by ``runner.notify.CLOSE_WAIT``; the final
checkpoint is committed and the lease released before it) and with a refused one, vs
notifications off. Reports only; last line one JSON object.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import colabjob  # noqa: E402
from benchmarks.overhead import BATCH, dataset, model_and_optimizer, train_step  # noqa: E402
from colabjob.jobs.data import make_loader  # noqa: E402
from colabjob.runner.notify import Notifier  # noqa: E402

CHUNK, ROUNDS, WARMUP_ROUNDS = 20, 60, 3


def hanging_endpoint() -> tuple[socket.socket, str]:
    """A socket that listens and never accepts: connects succeed, answers never come."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock, f"json://127.0.0.1:{sock.getsockname()[1]}/hook/token"


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"json://127.0.0.1:{port}/hook/token"


def loop(stack: ExitStack, notify: list[str], sender: Notifier | None) -> Iterator[None]:
    model, opt = model_and_optimizer()
    url = f"memory://notify-bench-{uuid.uuid4().hex}"
    s = stack.enter_context(
        colabjob.session(url, every_minutes=None, log=None, platform="local", notify=notify)
    )
    s.track(model=model, optimizer=opt, loader=make_loader(dataset(), batch_size=BATCH, seed=0))
    for n, (x, y) in enumerate(s.batches(), start=1):
        s.step(loss=train_step(model, opt, x, y).item())
        if sender is not None and n % CHUNK == 0:
            sender.send("bench", f"step {n}")  # queued behind a stuck request
        yield


def close_seconds(notify: list[str]) -> float:
    """Seconds from the end of a 3-step loop to the session being closed."""
    model, opt = model_and_optimizer()
    url = f"memory://notify-close-{uuid.uuid4().hex}"
    with colabjob.session(
        url, every_minutes=None, log=None, platform="local", notify=notify, max_steps=3
    ) as s:
        s.track(model=model, optimizer=opt, loader=make_loader(dataset(), batch_size=BATCH, seed=0))
        for x, y in s.batches():
            if s.step(loss=train_step(model, opt, x, y).item()):
                break
        t0 = time.perf_counter()
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    sock, hanging = hanging_endpoint()
    sender = Notifier([hanging])
    with ExitStack() as stack:
        loops = {
            "off": loop(stack, [], None),
            "off_twin": loop(stack, [], None),
            "hanging": loop(stack, [hanging], sender),
        }
        names = list(loops)
        rounds: list[dict[str, float]] = []
        for r in range(WARMUP_ROUNDS + ROUNDS):
            times: dict[str, float] = {}
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(CHUNK):
                    next(loops[name])
                times[name] = time.perf_counter() - t0
            if r >= WARMUP_ROUNDS:
                rounds.append(times)
        stuck = sender._queue.qsize()
    steps = CHUNK * ROUNDS
    for name in names:
        print(f"{name:>9}: {steps / sum(t[name] for t in rounds):8.1f} steps/s ({steps} steps)")

    def ratio(base: str, other: str) -> float:
        return statistics.median(t[base] / t[other] for t in rounds)

    close_off = close_seconds([])
    close_refused = close_seconds([refused_url()])
    close_hanging = close_seconds([hanging])
    print(f"messages still queued behind the hanging endpoint: {stuck}")
    print(
        f"closing a segment: off {close_off:.3f} s, refused endpoint {close_refused:.3f} s, "
        f"hanging endpoint {close_hanging:.3f} s (bounded by CLOSE_WAIT)"
    )
    sock.close()
    result = {
        "bench": "notify_overhead",
        "hanging_endpoint_vs_off": round(ratio("off", "hanging"), 4),
        "noise_floor_twin_vs_off": round(ratio("off", "off_twin"), 4),
        "close_s_off": round(close_off, 3),
        "close_s_refused": round(close_refused, 3),
        "close_s_hanging": round(close_hanging, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
