"""Pushing a job to a Kaggle kernel, and the next version from a paused one (``--chain``).

``push_kernel`` is ``colabjob kaggle push JOB --kernel USER/SLUG``: the job must be on
``gs://`` (exit 2 otherwise, before anything is opened), exist, not be finished, moved or
held by a live runner (``prepare.prepare_job``); the kernel settings go into ``job.json``'s
extras (no secrets), the kernel folder is written and ``kaggle kernels push -p DIR`` runs.

``continue_on_kaggle`` runs after a segment ends inside a kernel (``KAGGLE_KERNEL_RUN_TYPE``
set). When the job was pushed with ``--chain``, the segment paused at the session's limit
(stop reason ``budget``: Kaggle ends a session at 12 h and gives no signal first) and this is
rank 0, it pushes the next version of the same kernel, which resumes from the newest commit.
Two limits stop the chain: the count of versions pushed (``--max-versions``, the push times
kept in ``job.json``) and, with a GPU, the weekly GPU hours the user states
(``--weekly-gpu-hours``): the segments recorded on Kaggle within the last 7 days (Kaggle's
week is a calendar one; a rolling window never undercounts it) must leave at least
``MIN_SESSION_S``, and the next session's ``--budget`` is what is left (at most 12 h), so it
stops in time instead of being cut off when the quota runs out.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import colabjob
from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import ColabJobError, ConfigError, ExitCode
from colabjob.jobs.policy import StopReason
from colabjob.runner.handoff.gcloud import Runner
from colabjob.runner.handoff.kaggle import (
    EXTRAS_KEY,
    KaggleKernel,
    push_argv,
    run_kaggle,
    write_kernel,
)
from colabjob.runner.handoff.prepare import prepare_job
from colabjob.runner.platforms import PRESETS
from colabjob.runner.record import JobRecord, read_record, update_record

__all__ = [
    "MIN_SESSION_S",
    "WEEK_S",
    "ChainStep",
    "KagglePlan",
    "chain_decision",
    "continue_on_kaggle",
    "gpu_seconds_used",
    "push_kernel",
    "session_budget",
]

WEEK_S = 7 * 86400.0
SESSION_S = float(PRESETS["kaggle"] or 12 * 3600.0)
MIN_SESSION_S = 3600.0  # less quota than this left: a session would mostly install and load


def gpu_seconds_used(record: JobRecord, now: float) -> float:
    """Seconds of this job's Kaggle segments within the last ``WEEK_S`` (an open one counts
    up to ``now``)."""
    since = now - WEEK_S
    used = 0.0
    for seg in record.history:
        if seg.platform != "kaggle":
            continue
        end = seg.ended_at if seg.ended_at is not None else now
        used += max(0.0, min(end, now) - max(seg.started_at, since))
    return used


def session_budget(kernel: KaggleKernel, record: JobRecord, now: float) -> float | None:
    """The next session's budget in seconds: the stated GPU quota left, at most Kaggle's
    12 h; None without a GPU (no weekly quota: Kaggle's own limit applies)."""
    if not kernel.gpu:
        return None
    left = kernel.weekly_gpu_hours * 3600.0 - gpu_seconds_used(record, now)
    return min(SESSION_S, left)


@dataclass(frozen=True, kw_only=True)
class ChainStep:
    """The next version to push (``kernel`` None: none) and why, in words."""

    kernel: KaggleKernel | None
    budget_s: float | None
    why: str


def _stop(why: str) -> ChainStep:
    return ChainStep(kernel=None, budget_s=None, why=why)


def chain_decision(
    record: JobRecord,
    env: Mapping[str, str],
    *,
    job_url: str,
    exit_code: int,
    stop_reason: str | None,
    node_rank: int = 0,
    now: float,
) -> ChainStep:
    """Whether a segment that ended so pushes the next version (module docstring)."""
    settings = record.extras.get(EXTRAS_KEY)
    if not isinstance(settings, Mapping) or not settings.get("chain"):
        return _stop("the job was not pushed with --chain")
    if not env.get("KAGGLE_KERNEL_RUN_TYPE"):
        return _stop("not running in a Kaggle kernel")
    if exit_code != ExitCode.PAUSED or node_rank != 0:
        return _stop("the segment did not pause" if node_rank == 0 else "not rank 0")
    if stop_reason != StopReason.BUDGET.value:
        return _stop(f"the pause ({stop_reason}) is not the session limit's")
    kernel = KaggleKernel.from_extras(settings, job_url=job_url, version=colabjob.__version__)
    pushed = len(settings.get("pushes", ()))
    if pushed >= kernel.max_versions:
        return _stop(f"{pushed} versions pushed already (--max-versions {kernel.max_versions})")
    budget = session_budget(kernel, record, now)
    if budget is not None and budget < MIN_SESSION_S:
        used = gpu_seconds_used(record, now) / 3600.0
        return _stop(
            f"{used:.1f} of the stated {kernel.weekly_gpu_hours:g} weekly GPU hours used "
            "(--weekly-gpu-hours)"
        )
    return ChainStep(kernel=kernel, budget_s=budget, why=f"version {pushed + 1} of at most "
                     f"{kernel.max_versions}")


def _record_push(
    store: Any, kernel: KaggleKernel, now: float, *, first: bool, clock: Clock
) -> None:
    def change(record: JobRecord) -> JobRecord:
        old = record.extras.get(EXTRAS_KEY)
        pushes = [] if first or not isinstance(old, Mapping) else list(old.get("pushes", ()))
        return record.with_extras(**{EXTRAS_KEY: {**kernel.to_extras(), "pushes": [*pushes, now]}})

    update_record(store, change, clock=clock)


def continue_on_kaggle(
    url: str,
    *,
    exit_code: int,
    stop_reason: str | None,
    node_rank: int,
    env: Mapping[str, str],
    say: Callable[[str], None],
    kaggle: str = "kaggle",
    runner: Runner = subprocess.run,
    clock: Clock = SYSTEM_CLOCK,
) -> bool:
    """Push the next version if ``chain_decision`` says so; True when it was pushed. A
    failure is told, never raised: the job stays paused and resumable by hand."""
    from colabjob.storage.store import open_store

    if not env.get("KAGGLE_KERNEL_RUN_TYPE") or exit_code != ExitCode.PAUSED:
        return False
    try:
        store = open_store(url)
        got = read_record(store)
        if got is None:
            return False
        now = clock.time()
        step = chain_decision(
            got[0], env, job_url=store.url, exit_code=exit_code, stop_reason=stop_reason,
            node_rank=node_rank, now=now,
        )  # fmt: skip
        if step.kernel is None:
            if isinstance(got[0].extras.get(EXTRAS_KEY), Mapping):
                say(f"colabjob: no next Kaggle version: {step.why}")
            return False
        with tempfile.TemporaryDirectory(prefix="colabjob-kaggle-") as tmp:
            folder = write_kernel(step.kernel, Path(tmp), budget_s=step.budget_s)
            run_kaggle(push_argv(folder, kaggle=kaggle), runner=runner)
        _record_push(store, step.kernel, now, first=False, clock=clock)
    except (ColabJobError, OSError) as e:
        say(f"colabjob: could not push the next Kaggle version: {e}")
        return False
    say(f"colabjob: pushed the next version of kernel {step.kernel.kernel} ({step.why}); "
        "it resumes the job")
    return True


@dataclass(frozen=True, kw_only=True)
class KagglePlan:
    """What ``push_kernel`` did (or, with ``dry_run``, would do)."""

    kernel: KaggleKernel
    folder: Path
    argv: tuple[str, ...]
    budget_s: float | None
    dry_run: bool
    warnings: tuple[str, ...] = ()


def push_kernel(
    job_url: str,
    *,
    kernel: str,
    gpu: bool = False,
    chain: bool = False,
    max_versions: int,
    weekly_gpu_hours: float,
    datasets: Sequence[str] = (),
    extra_packages: Sequence[str] = (),
    folder: str | Path | None = None,
    dry_run: bool = False,
    kaggle: str = "kaggle",
    runner: Runner = subprocess.run,
    clock: Clock = SYSTEM_CLOCK,
) -> KagglePlan:
    """``colabjob kaggle push`` (module docstring)."""
    spec = KaggleKernel(  # validates, and refuses a job off GCS, before anything is opened
        kernel=kernel, job_url=job_url.rstrip("/"), version=colabjob.__version__, gpu=gpu,
        chain=chain, max_versions=max_versions, weekly_gpu_hours=weekly_gpu_hours,
        datasets=tuple(datasets), extra_packages=tuple(extra_packages),
    )  # fmt: skip
    job = prepare_job(spec.job_url, to=None, clock=clock, extra_packages=extra_packages)
    now = clock.time()
    budget = session_budget(spec, job.record, now)
    if budget is not None and budget < MIN_SESSION_S:
        used = gpu_seconds_used(job.record, now) / 3600.0
        raise ConfigError(
            f"this job used {used:.1f} of the stated {weekly_gpu_hours:g} weekly GPU hours on "
            "Kaggle in the last 7 days: less than an hour is left",
            hint="push it later, without --gpu, or state your quota with --weekly-gpu-hours",
        )
    out = Path(folder) if folder is not None else Path.cwd() / f"kaggle-{spec.slug}"
    write_kernel(spec, out, budget_s=budget)
    plan = KagglePlan(
        kernel=spec, folder=out, argv=tuple(push_argv(out, kaggle=kaggle)), budget_s=budget,
        dry_run=dry_run, warnings=job.warnings,
    )  # fmt: skip
    if dry_run:
        return plan
    run_kaggle(plan.argv, runner=runner)
    _record_push(job.src, spec, now, first=True, clock=clock)
    return plan
