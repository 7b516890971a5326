"""Notifications (issue 14) against a real local HTTP server that apprise's ``json://`` posts
to: redaction, the URL sources, the refusal without apprise, each event once, nothing when
off, a dead or blocked endpoint never holding up the training thread, and no token in the
job's files or the CLI's output. Sessions run in-process with a fake clock; the CLI test
SIGKILLs a real job and resumes it."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import colabjob
from colabjob.errors import ConfigError
from colabjob.runner.notify import Notifier, notify_urls, redact, require_notify, scrub
from colabjob.runner.notify_events import JobNotices, claim
from colabjob.runner.record import Segment, create_record, load_record
from colabjob.runner.states import JobState
from colabjob.storage import open_store
from tests.cli.builders import REPO, run_cli, run_main, tiny_train_script
from tests.fakes import FakeClock
from tests.jobs.helpers import train_tiny

TOKEN = "s3cr3t-t0ken-4711"
WAIT = 60.0  # a bound for a message to arrive; never a deadline under test


class Hook:
    """A local endpoint: records every JSON body; ``gate`` cleared holds each request."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.arrived.set()
                hook.gate.wait(WAIT)
                hook.bodies.append({"path": self.path, **json.loads(data)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook/{TOKEN}"

    def messages(self) -> list[str]:
        return [f"{b['title']} | {b['message']}" for b in self.bodies]


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.gate.set()
    h.server.shutdown()


def _dead_url() -> str:
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"json://127.0.0.1:{port}/hook/{TOKEN}"


def _files_mention(root: Path, text: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# ---- the URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ntfy://ntfy.sh/my-topic-x1", "ntfy://ntfy.sh/***"),
        ("tgram://123456789:AAbbCCdd/987654", "tgram://***"),
        ("json://127.0.0.1:8080/hook?token=abc", "json://127.0.0.1:8080/***"),
        ("mailto://me:pw@gmail.com", "mailto://***@gmail.com"),
        ("ntfy://bare-topic", "ntfy://***"),
        ("not a url", "***"),
    ],
)
def test_redact_keeps_the_scheme_and_a_real_host_only(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert scrub(f"posting to {url} failed", [url]) == f"posting to {shown} failed"


def test_urls_join_the_spec_the_flags_and_the_environment() -> None:
    env = {"COLABJOB_NOTIFY": "json://e/1 ntfy://ntfy.sh/t,json://a/1\n"}
    got = notify_urls(["json://a/1"], ["json://b/1", "json://a/1"], environ=env)
    assert got == ("json://a/1", "json://b/1", "json://e/1", "ntfy://ntfy.sh/t")
    assert notify_urls(environ={}) == ()


def test_without_apprise_a_configured_notification_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "apprise", None)  # import apprise -> ImportError
    with pytest.raises(ConfigError) as e:
        require_notify([f"ntfy://ntfy.sh/{TOKEN}"])
    assert e.value.exit_code == 2 and "colabjob[notify]" in str(e.value)
    assert TOKEN not in str(e.value)
    require_notify([])  # nothing configured: nothing needed
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"job: {{name: n, kind: python, entrypoint: t:main, storage: {tmp_path / 'job'}}}\n"
    )
    out = run_main("start", str(spec), "--notify", f"ntfy://ntfy.sh/{TOKEN}")
    assert out.returncode == 2 and "pip install 'colabjob[notify]'" in out.stderr
    assert TOKEN not in out.stderr + out.stdout and not (tmp_path / "job").exists()


def test_notify_test_reports_the_endpoints_answer(hook: Hook) -> None:
    ok = run_main("notify", "test", hook.url)
    assert ok.returncode == 0 and "sent a test message to json://127.0.0.1" in ok.stdout
    assert len(hook.bodies) == 1 and hook.bodies[0]["path"].endswith(TOKEN)
    dead = run_main("notify", "test", _dead_url(), "--timeout", "2")
    assert dead.returncode == 1 and "not delivered" in dead.stderr
    assert TOKEN not in dead.stderr + dead.stdout + ok.stdout + ok.stderr
    assert run_main("notify", "test", "nonsense://x").returncode == 2


# ---- sending ----------------------------------------------------------------------------------


def test_a_dead_endpoint_is_logged_once_and_the_others_still_get_every_message(
    hook: Hook,
) -> None:
    said: list[str] = []
    n = Notifier([_dead_url(), hook.url], timeout=2, say=said.append)
    for i in range(3):
        n.send("t", f"m{i}")
    n.close(wait=WAIT)
    assert [b["message"] for b in hook.bodies] == ["m0", "m1", "m2"]
    assert len(said) == 1 and "json://127.0.0.1" in said[0] and TOKEN not in said[0]


@pytest.mark.slow
def test_the_training_loop_finishes_while_the_endpoint_holds_every_request(
    tmp_path: Path, hook: Hook
) -> None:
    """Sending is off the training thread: with the endpoint holding its first request
    (a fallback event queued mid-loop would wait behind it), all steps still run."""
    hook.gate.clear()
    n = Notifier([hook.url], timeout=30)
    n.send("t", "held")
    assert hook.arrived.wait(WAIT)  # the sender thread is inside the request now
    clock = FakeClock()
    url = str(tmp_path / "job")
    with colabjob.session(
        url, clock=clock, log=None, platform="local", max_steps=6, notify=[hook.url]
    ) as s:
        train_tiny(s, clock=clock)
        n.send("t", "from the loop")  # queued behind the held one: returns at once
    assert s.outcome is not None and s.outcome.completed and s.outcome.last_step == 6
    assert hook.bodies == []  # nothing got through while the endpoint held it
    hook.gate.set()
    n.close(wait=WAIT)
    assert "from the loop" in [b["message"] for b in hook.bodies]


# ---- events ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pause_and_completion_are_each_told_once_and_no_token_is_written(
    tmp_path: Path, hook: Hook
) -> None:
    clock, url = FakeClock(), str(tmp_path / "job")
    with colabjob.session(
        url, clock=clock, log=None, platform="local", budget="1h", every_steps=10,
        max_steps=200, notify=[hook.url],
    ) as s:  # fmt: skip
        train_tiny(s, clock=clock)  # stops on the budget
    paused_at = s.outcome.last_step
    assert load_record(open_store(url)).state is JobState.SUSPENDED
    assert len(hook.bodies) == 1
    (msg,) = hook.messages()
    assert f"paused at step {paused_at}/200 (budget)" in msg
    assert "more session(s) at this pace" in msg and "run the training script again" in msg
    store = open_store(url)
    record = load_record(store)
    again = JobNotices(  # the same segment end, told again (a rerun after a SIGKILL)
        store, Notifier([hook.url]), record=record, max_steps=200, checkpoint_every=None,
        clock=clock,
    )  # fmt: skip
    again.segment_end(record, url)
    again.close()
    assert len(hook.bodies) == 1
    with colabjob.session(
        url, clock=clock, log=None, platform="local", max_steps=paused_at + 3,
        notify=[hook.url],
    ) as s:  # fmt: skip
        train_tiny(s)
    assert len(hook.bodies) == 2 and "completed at step" in hook.messages()[1]
    assert "final loss" in hook.messages()[1]
    assert load_record(store).extras["notify"] == [redact(hook.url)]
    assert _files_mention(tmp_path / "job", TOKEN) == []
    assert json.loads((tmp_path / "job" / "control" / "notified.json").read_text())["sent"] == [
        f"paused:step-{paused_at}",
        "completed",
    ]


def test_nothing_is_sent_when_notifications_are_off(tmp_path: Path, hook: Hook) -> None:
    clock = FakeClock()
    with colabjob.session(
        str(tmp_path / "job"), clock=clock, log=None, platform="local", budget="1h",
        max_steps=200,
    ) as s:  # fmt: skip
        train_tiny(s, clock=clock)
    assert s.outcome.stop_reason == "budget" and hook.bodies == []
    assert not (tmp_path / "job" / "control" / "notified.json").exists()


def test_a_failure_is_told_with_its_error_line(tmp_path: Path, hook: Hook) -> None:
    clock = FakeClock()

    def boom(s: Any) -> None:
        if s.global_step == 2:
            raise RuntimeError("CUDA error: device-side assert triggered\nmore lines")

    with pytest.raises(RuntimeError), colabjob.session(
        str(tmp_path / "job"), clock=clock, log=None, platform="local", notify=hook.url
    ) as s:  # one URL given as a string is one URL
        train_tiny(s, clock=clock, after=boom)
    (msg,) = hook.messages()
    assert msg.startswith("colabjob: job failed | RuntimeError: CUDA error: device-side assert")
    assert "more lines" not in msg and "Fix the cause, then:" in msg


def test_a_claimed_event_is_claimed_once(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "job"))
    assert claim(store, "paused:step-3") and claim(store, "completed")
    assert not claim(store, "paused:step-3") and not claim(store, "completed")


def test_a_stall_a_fallback_and_a_lost_lease_are_each_told_once(
    tmp_path: Path, hook: Hook
) -> None:
    clock = FakeClock()
    store = open_store(str(tmp_path / "job"))
    record = create_record(store, job_id="j", config={}, clock=clock)
    record = record.begin_segment(
        Segment(session_id="s", platform="local", host="h", started_at=0.0, checkpoint_step=30)
    )
    notices = JobNotices(
        store, Notifier([hook.url]), record=record, max_steps=None, checkpoint_every=60.0,
        clock=clock,
    )  # fmt: skip
    notices.on_status({"checkpoint_step": 20})  # resumed below the newest commit (30)
    notices.check_stall()  # within twice the interval: nothing
    clock.advance(121)
    notices.check_stall()
    notices.check_stall()
    notices.lease_lost("epoch 3 > 2")
    notices.lease_lost("epoch 3 > 2")
    notices.close()
    titles = [b["title"] for b in hook.bodies]
    assert titles == [
        "colabjob: j fell back to an older checkpoint",
        "colabjob: j no checkpoint committed",
        "colabjob: j lease lost",
    ]
    assert "resumed from step 20" in hook.bodies[0]["message"]


# ---- the CLI: a pause told once across a SIGKILL and a resume -----------------------------------

TRAIN = tiny_train_script(
    """
        if session.global_step == args["pause_at"] and not os.path.exists(args["m1"]):
            open(args["m1"], "w").close()
            os.kill(os.getppid(), signal.SIGTERM)  # the supervisor forwards it: pause
        if session.global_step == args["kill_at"] and not os.path.exists(args["m2"]):
            open(args["m2"], "w").close()
            os.kill(os.getppid(), signal.SIGKILL)  # the VM vanishes: supervisor...
            os.kill(os.getpid(), signal.SIGKILL)  # ...and the training process
"""
)


@pytest.mark.slow
def test_the_cli_tells_a_pause_once_across_a_sigkill_and_a_resume(
    tmp_path: Path, hook: Hook
) -> None:
    (tmp_path / "notify_train.py").write_text(TRAIN)
    job = tmp_path / "job"
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"job: {{name: nt, kind: python, entrypoint: notify_train:main, storage: {job},\n"
        f"  args: {{pause_at: 6, kill_at: 13, m1: {tmp_path / 'm1'}, m2: {tmp_path / 'm2'}}}}}\n"
        "training: {max_steps: 20}\ncheckpoint: {every_steps: 5, every_minutes: null}\n"
        f"budget: {{platform: local}}\nnotify: [{hook.url}]\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    first = run_cli("start", str(spec), "--retries", "0", env=env)
    assert first.returncode == 75, first.stderr
    assert len(hook.bodies) == 1 and f"colabjob resume {job}" in hook.bodies[0]["message"]
    killed = run_cli("resume", str(job), "--notify", hook.url, "--retries", "0", env=env)
    assert killed.returncode == -signal.SIGKILL
    assert len(hook.bodies) == 1  # a SIGKILL tells nothing
    last = run_cli("resume", str(job), env={**env, "COLABJOB_NOTIFY": hook.url})
    assert last.returncode == 0, last.stderr
    titles = [b["title"] for b in hook.bodies]
    assert titles == ["colabjob: job paused", "colabjob: job completed"]
    status = run_cli("status", str(job), "--json", env=env)
    outputs = [first, killed, last, status]
    assert all(TOKEN not in o.stdout + o.stderr for o in outputs)
    assert "json://127.0.0.1" in first.stderr  # shown redacted
    assert _files_mention(job, TOKEN) == []
    assert os.path.exists(tmp_path / "m2")


# ---- a handoff: the URLs travel through Secret Manager, never in the startup script ----------


def _startup(**kw: Any) -> str:
    from colabjob.runner.handoff.startup_script import render_startup_script

    return render_startup_script(
        job_url="gs://bucket/jobs/run1", version=colabjob.__version__, gpu=False,
        instance="colabjob-run1", zone="us-central1-a", project="my-project", **kw,
    )  # fmt: skip


@pytest.mark.parametrize("secret", [None, "colabjob-notify"])
def test_the_startup_script_reads_the_urls_from_a_secret_and_stays_valid_bash(
    tmp_path: Path, secret: str | None
) -> None:
    import shutil
    import subprocess

    path = tmp_path / "startup.sh"
    path.write_text(_startup(notify_secret=secret))
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is missing: apt-get install -y shellcheck (Debian/Ubuntu)")
    lint = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    assert lint.returncode == 0, lint.stdout
    text = path.read_text()
    assert (f"NOTIFY_SECRET={secret}" if secret else "NOTIFY_SECRET=''") in text


@pytest.mark.parametrize("readable", [True, False])
def test_the_vm_reads_the_secret_before_each_resume(tmp_path: Path, readable: bool) -> None:
    from tests.runner.vm_stubs import FakeVm

    vm = FakeVm(tmp_path, installed=colabjob.__version__)
    done = vm.run(
        _startup(notify_secret="colabjob-notify"),
        STUB_RC="0",
        STUB_GCLOUD_RC="0" if readable else "1",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert vm.gcloud_calls == [
        "[secrets][versions][access][latest][--secret=colabjob-notify][--project][my-project]"
    ]
    assert ("could not read the secret colabjob-notify" in vm.log) is not readable
    assert vm.stub_log("colabjob").splitlines() == ["resume gs://bucket/jobs/run1 --platform gce"]


@pytest.mark.gcs
def test_a_handoff_of_a_job_with_notifications_says_how_to_pass_them(
    tmp_path: Path, hook: Hook, gcs_bucket: str
) -> None:
    from colabjob.runner.handoff.to_vm import handoff

    clock = FakeClock()
    with colabjob.session(
        gcs_bucket, clock=clock, log=None, platform="local", budget="1h", max_steps=200,
        every_steps=50, notify=[hook.url],
    ) as s:  # fmt: skip
        train_tiny(s, clock=clock)
    vm = {"project": "my-project", "zone": "us-central1-a", "machine_type": "n1-standard-4"}
    plan = handoff(gcs_bucket, **vm, dry_run=True, script_path=tmp_path / "s.sh")
    (warning,) = [w for w in plan.warnings if "notif" in w]
    assert redact(hook.url) in warning and "--notify-secret NAME" in warning
    assert TOKEN not in warning and TOKEN not in (tmp_path / "s.sh").read_text()
    plan = handoff(gcs_bucket, **vm, dry_run=True, script_path=tmp_path / "s2.sh",
                   notify_secret="colabjob-notify")  # fmt: skip
    assert not [w for w in plan.warnings if "notif" in w]
    assert "NOTIFY_SECRET=colabjob-notify" in (tmp_path / "s2.sh").read_text()
