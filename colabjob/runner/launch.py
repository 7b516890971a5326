"""Start N training processes on this machine, torchrun-style, and supervise them as one.

``launch(command, nproc=N)`` starts ``command`` once per rank with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (a
free port on 127.0.0.1) set. On several machines (``nnodes``, ``node_rank``,
``master_addr``, ``master_port``; ``colabjob.runner.topology`` reads them from flags,
torchrun, SLURM or SkyPilot) each machine runs one launcher for its local ranks: global rank
``node_rank * nproc + local_rank`` of ``nnodes * nproc``, and the ranks meet through torch's
own TCPStore rendezvous at the master (``colabjob.jobs.distributed.init_distributed``);
there is no protocol of ours between launchers. What this adds over torchrun: SIGUSR1 is
forwarded (torchrun's agent drops it, and SLURM's ``--signal=USR1`` is the usual notice), and
exit 75 (paused: checkpointed, resume later) is not a failure that tears the others down
(torchrun treats any non-zero exit as one). Each rank runs in its own session (a terminal's
Ctrl-C reaches the launcher only, which forwards it once) and, on Linux, is told to receive
SIGTERM if the launcher dies.
SIGTERM, SIGINT, SIGUSR1 and SIGHUP (as SIGTERM) are forwarded to every rank: each rank's
watchdog and the Session's per-step agreement stop them all at the same step. When a rank
fails (an exit code outside ``ok_codes``, or a signal) the others get SIGTERM and, ``grace``
seconds later, SIGKILL: a rank blocked in a collective with a dead peer may never return.
Once a rank has ended normally the others get ``exit_grace`` seconds to follow. The exit
code is rank 0's when every rank ended normally, else the failing rank's.

As a module it is the supervisor's child for ``colabjob start/resume --nproc N``:
``python -m colabjob.runner.launch --nproc N --module M child REQUEST RESULT`` runs
``python -m M child ...`` on every rank; rank 0 writes RESULT and shows the progress, rank
``r`` writes ``RESULT.rank<r>`` and shows none. If rank 0 left no result, a failed rank's
takes its place, so the supervisor sees the real error. ``python -m colabjob.runner.launch
--nproc N [--nnodes M --node-rank R --master-addr HOST --master-port P] -- CMD ...``
launches any command (e.g. a script using ``colabjob.session()``) on this machine's ranks.

Every entry point (``launch``, ``Launcher.start``, this module's ``main`` and the CLI's
``--nproc``) refuses more ranks than the machine can run (``check_nproc``: one per visible
GPU with CUDA, else one per CPU core this process may use; ``colabjob.runner.ranks``, with
each rank's environment) before anything starts: each rank costs a Python process with
torch loaded, and an unbounded count once exhausted a machine's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colabjob.errors import ConfigError, ExitCode
from colabjob.runner.child_protocol import ChildResult, RunRequest
from colabjob.runner.ranks import check_nproc, free_port, rank_env
from colabjob.runner.signals import ForwardedSignals, as_child_signal
from colabjob.runner.topology import add_node_flags, topology_from_args

__all__ = [
    "LaunchResult",
    "Launcher",
    "launch",
    "main",
    "rank_path",
]

DEFAULT_GRACE = 10.0  # SIGTERM -> SIGKILL for the ranks left after a failure
DEFAULT_EXIT_GRACE = 120.0  # how long the other ranks may take once one ended normally


@dataclass(frozen=True, kw_only=True)
class LaunchResult:
    """How the ranks ended: ``returncodes`` per rank (negative: killed by that signal)."""

    exit_code: int
    returncodes: tuple[int, ...]
    failed_rank: int | None = None
    timed_out: bool = False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class Launcher:
    """Runs ``commands[r]`` as rank ``r`` and waits for all of them (see the module)."""

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        *,
        env: Mapping[str, str] | None = None,
        ok_codes: Sequence[int] = (0,),
        grace: float = DEFAULT_GRACE,
        exit_grace: float = DEFAULT_EXIT_GRACE,
        timeout: float | None = None,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        nnodes: int = 1,
        node_rank: int = 0,
        cwd: str | os.PathLike[str] | None = None,
        poll: float = 0.05,
        watch_parent: bool = False,
    ) -> None:
        if not commands:
            raise ValueError("no command to launch")
        self.commands = [list(c) for c in commands]
        self.env = dict(os.environ if env is None else env)
        self.ok_codes = tuple(ok_codes)
        self.grace, self.exit_grace, self.timeout = grace, exit_grace, timeout
        self.master_addr = master_addr
        self.nnodes, self.node_rank = nnodes, node_rank
        if master_port is None and nnodes > 1:
            raise ValueError("several nodes need the master's port (every node the same)")
        self.master_port = master_port or free_port(master_addr)
        self.cwd, self.poll, self.watch_parent = cwd, poll, watch_parent
        self.procs: list[subprocess.Popen[bytes]] = []
        self._signals = ForwardedSignals(self._forward)

    @property
    def nproc(self) -> int:
        return len(self.commands)

    # -- signals ----------------------------------------------------------------------------
    def send(self, signum: int) -> None:
        """Send ``signum`` to every rank still running."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    def _forward(self, signum: int, frame: object) -> None:
        self.send(as_child_signal(signum))

    # -- running ----------------------------------------------------------------------------
    def start(self) -> None:
        check_nproc(self.nproc)  # before the first process: a library caller is bounded too
        for rank, cmd in enumerate(self.commands):
            env = rank_env(
                self.env,
                rank=rank,
                nproc=self.nproc,
                master_addr=self.master_addr,
                master_port=self.master_port,
                nnodes=self.nnodes,
                node_rank=self.node_rank,
            )
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    cwd=self.cwd,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # no threads of ours run yet
                )
            )
        if self.watch_parent:
            self._watch_parent()

    def _watch_parent(self) -> None:
        """If our parent (the supervisor) dies, stop the ranks as if told to."""
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            self.send(signal.SIGTERM)

        threading.Thread(target=watch, name="colabjob-launch-parent", daemon=True).start()

    def run(self) -> LaunchResult:
        self._signals.install()
        try:
            self.start()
            return self._wait()
        finally:
            for p in self.procs:  # never leave a rank behind (an exception in the wait)
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self._signals.restore()

    def _wait(self) -> LaunchResult:
        now = time.monotonic
        deadline = None if self.timeout is None else now() + self.timeout
        failed: int | None = None
        timed_out = False
        kill_at: float | None = None
        first_exit: float | None = None
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            if failed is None:
                failed = next(
                    (r for r, c in enumerate(codes) if c is not None and c not in self.ok_codes),
                    None,
                )
                if (
                    failed is None
                    and first_exit is not None
                    and now() > first_exit + (self.exit_grace)
                ):
                    failed = next(r for r, c in enumerate(codes) if c is None)  # hung
                if failed is None and deadline is not None and now() > deadline:
                    failed, timed_out = next(r for r, c in enumerate(codes) if c is None), True
                if failed is not None:
                    self.send(signal.SIGTERM)
                    kill_at = now() + self.grace
            if first_exit is None and any(c is not None for c in codes):
                first_exit = now()
            if kill_at is not None and now() > kill_at:
                self.send(signal.SIGKILL)
                kill_at = None
            time.sleep(self.poll)
        codes_done = tuple(int(p.returncode) for p in self.procs)
        if failed is None:
            failed = next((r for r, c in enumerate(codes_done) if c not in self.ok_codes), None)
        code = codes_done[0] if failed is None else codes_done[failed]
        if failed is not None and (code in self.ok_codes or timed_out):
            code = 1  # a hung or timed-out rank, ended by our signal
        elif code < 0:
            code = 128 - code  # the shell's convention for "killed by signal N"
        return LaunchResult(
            exit_code=code, returncodes=codes_done, failed_rank=failed, timed_out=timed_out
        )


def launch(
    command: Sequence[str] | Callable[[int], Sequence[str]], *, nproc: int, **kwargs: Any
) -> LaunchResult:
    """Run ``command`` (or ``command(rank)``) as ``nproc`` ranks; see ``Launcher``."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    check_nproc(nproc)
    commands = [command(r) if callable(command) else command for r in range(nproc)]
    return Launcher(commands, **kwargs).run()


# -- the supervisor's child ------------------------------------------------------------------
def rank_path(path: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` > 0 reads its request / writes its result (next to rank 0's)."""
    p = Path(path)
    return p if rank == 0 else p.with_name(f"{p.name}.rank{rank}")


def _child_commands(module: str, request: Path, result: Path, nproc: int) -> list[list[str]]:
    req = RunRequest.from_json(request.read_text())
    quiet = dataclasses.replace(req, progress="none")  # one display: rank 0's
    commands = []
    for rank in range(nproc):
        if rank:
            rank_path(request, rank).write_text(quiet.to_json())
        commands.append(
            [
                sys.executable,
                "-m",
                module,
                "child",
                str(rank_path(request, rank)),
                str(rank_path(result, rank)),
            ]
        )
    return commands


def _adopt_rank_result(result: Path, outcome: LaunchResult) -> None:
    """Rank 0 left no result: take the failed rank's (or any rank's), naming the rank."""
    if result.exists():
        return
    order = [outcome.failed_rank] if outcome.failed_rank else []
    order += [r for r in range(1, len(outcome.returncodes)) if r not in order]
    for rank in order:
        path = rank_path(result, rank)
        if not path.exists():
            continue
        try:
            got = ChildResult.from_json(path.read_text())
        except (ValueError, TypeError):
            continue
        if got.error:
            got = dataclasses.replace(got, error=f"rank {rank}: {got.error}")
        tmp = result.with_suffix(".tmp")
        tmp.write_text(got.to_json())
        os.replace(tmp, result)
        return


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m colabjob.runner.launch",
        description="Run N training processes on this machine (torchrun-style environment).",
    )
    p.add_argument("--nproc", type=int, required=True, help="processes (ranks) to start")
    p.add_argument("--module", default="colabjob.runner.child_protocol", help="the child module")
    add_node_flags(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="child REQ RES, or -- CMD ...")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.nproc < 1 or not command:
        p.print_usage(sys.stderr)
        return ExitCode.USAGE
    try:
        check_nproc(args.nproc)  # before _child_commands writes a request file per rank
        topo = topology_from_args(args)
    except ConfigError as e:
        print(f"colabjob: error: {e}", file=sys.stderr, flush=True)
        return ExitCode.USAGE
    where: dict[str, Any] = {
        "nnodes": topo.nnodes,
        "node_rank": topo.node_rank,
        "master_addr": topo.master_addr,
        "master_port": topo.master_port,
    }
    if command[0] != "child":
        return launch(command, nproc=args.nproc, ok_codes=(0, ExitCode.PAUSED), **where).exit_code
    if len(command) != 3:
        p.print_usage(sys.stderr)
        return ExitCode.USAGE
    request, result = Path(command[1]), Path(command[2])
    launcher = Launcher(
        _child_commands(args.module, request, result, args.nproc),
        ok_codes=(ExitCode.DONE, ExitCode.PAUSED),
        watch_parent=True,
        **where,
    )
    outcome = launcher.run()
    _adopt_rank_result(result, outcome)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
