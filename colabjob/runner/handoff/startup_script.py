"""The bash startup script a handed-off job's GCE VM runs at every boot.

It installs colabjob pinned to this version (once, into its own venv), waits for the GPU
driver where a GPU is expected, resumes the job from GCS with the GCE platform profile (the
runner long-polls the spot preemption notice; the script forwards SIGTERM to it), and then
powers the VM off so that nobody pays for an idle GPU: after completion (exit 0), a failure
(any exit but 75), or a pause that was not a preemption (stop request, time budget). After a
spot preemption (exit 75 and the metadata server says ``preempted``) GCE stops the VM itself;
the script logs how to restart it (``gcloud compute instances start``: it resumes at boot).

With ``mig`` (``--restart-on-preemption``) the VM belongs to that managed instance group of
size 1, which recreates any VM that stops. So instead of powering off, the script resizes the
group to 0 (``gcloud compute instance-groups managed resize``: the group deletes the VM, disk
and all), and after a preemption it leaves the VM to the group, whose new VM resumes the job.
If the resize fails three times it powers off after all, and logs the command to run by hand.

The values are baked in, shell-quoted; nothing here is a credential: the VM's service account
reaches GCS. The job's output goes straight to a log file (a dying console reader can never
break its writes) that a ``tail`` mirrors to stdout, which the guest agent forwards to the
serial console and Cloud Logging. Environment variables override the paths for tests:
``COLABJOB_LOG_FILE``, ``COLABJOB_VENV``, ``COLABJOB_PYTHON``, ``COLABJOB_SHUTDOWN_CMD``,
``COLABJOB_GPU_WAIT_S``, ``COLABJOB_RETRY_SLEEP_S``, and ``GCE_METADATA_HOST``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from colabjob.errors import ConfigError, ExitCode
from colabjob.runner.handoff.gcloud import template_name_for

__all__ = ["TORCH_CPU_INDEX", "checked_value", "render_startup_script"]

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_CREDENTIAL_IN_URL = re.compile(r"://[^/\s]*@")


def checked_value(what: str, value: str) -> str:
    if not value or any(c in value for c in "\n\r\0"):
        raise ConfigError(f"{what} {value!r} cannot go into a startup script")
    if _CREDENTIAL_IN_URL.search(value):
        raise ConfigError(
            f"{what} {value!r} carries a credential (user:token@host)",
            hint="never put credentials in VM metadata: use a public package, or a private "
            "index the VM's service account can read (Artifact Registry)",
        )
    return value


def _literal_note(values: Sequence[str]) -> str:
    # shellcheck flags '$(...)' inside single quotes (SC2016); here it is meant literally.
    return "# shellcheck disable=SC2016\n" if any(c in v for v in values for c in "$`") else ""


def _assign(name: str, value: str) -> str:
    return f"{_literal_note([value])}{name}={shlex.quote(checked_value(name, value))}"


def _array(name: str, values: Sequence[str]) -> str:
    quoted = " ".join(shlex.quote(checked_value(name, v)) for v in values)
    return f"{_literal_note(values)}{name}=({quoted})"


def render_startup_script(
    *,
    job_url: str,
    version: str,
    gpu: bool,
    instance: str,
    zone: str,
    project: str,
    extra_packages: Sequence[str] = (),
    resume_args: Sequence[str] = (),
    torch_cpu_index: str = TORCH_CPU_INDEX,
    mig: str | None = None,
    notify_secret: str | None = None,
) -> str:
    """The startup script (bash) that resumes ``job_url`` (a ``gs://`` URL) on the VM.
    ``notify_secret``: a Secret Manager secret whose value (notification URLs, which hold
    tokens: never in the script) becomes ``COLABJOB_NOTIFY`` before each resume."""
    if not job_url.startswith("gs://"):
        raise ConfigError(
            f"the VM resumes from GCS; {job_url!r} is not a gs:// URL",
            hint="hand off with --to gs://BUCKET/PATH",
        )
    values = {
        "JOB_URL": job_url,
        "COLABJOB_VERSION": version,
        "INSTANCE": instance,
        "ZONE": zone,
        "PROJECT": project,
        "TORCH_CPU_INDEX": torch_cpu_index,
    }
    if mig is not None:
        values.update(MIG=mig, TEMPLATE=template_name_for(mig))
    if notify_secret is not None:
        values["NOTIFY_SECRET"] = notify_secret
    lines = [_assign(k, v) for k, v in values.items()]
    lines += [
        *([] if mig is not None else ["MIG=''  # not in a managed instance group", "TEMPLATE=''"]),
        *([] if notify_secret is not None else ["NOTIFY_SECRET=''  # no notifications"]),
        f"EXPECT_GPU={1 if gpu else 0}",
        f"EX_PAUSED={int(ExitCode.PAUSED)}",
        _array("EXTRA_PACKAGES", extra_packages),
        _array("RESUME_ARGS", resume_args),
    ]
    where = f"--zone {zone} --project {project}"
    if mig is None:
        after = _AFTER_VM.format(
            paused=int(ExitCode.PAUSED),
            start=f"gcloud compute instances start {instance} {where}",
        )
    else:
        after = _AFTER_MIG.format(
            paused=int(ExitCode.PAUSED),
            mig=mig,
            resize=f"gcloud compute instance-groups managed resize {mig} --size=0 {where}",
        )
    head = _HEAD.format(
        version=version,
        instance=instance,
        after=after,
        serial=f"gcloud compute instances get-serial-port-output {instance} {where}",
    )
    return head + "\n".join(lines) + "\n" + _BODY


_HEAD = """\
#!/usr/bin/env bash
# colabjob startup script for the GCE VM {instance}, written by `colabjob handoff`
# (colabjob {version}). GCE runs it at every boot.
#
# It installs colabjob {version} (once), resumes the job from GCS with the GCE platform
# profile (the runner watches the spot preemption notice), and then:
{after}# No credentials in here: the VM's service account (--scopes=cloud-platform) reaches GCS.
# Log: /var/log/colabjob-startup.log on the VM, and the serial console / Cloud Logging:
#   {serial}
# Environment overrides (tests): COLABJOB_LOG_FILE, COLABJOB_VENV, COLABJOB_PYTHON,
# COLABJOB_SHUTDOWN_CMD, COLABJOB_GPU_WAIT_S, COLABJOB_RETRY_SLEEP_S, GCE_METADATA_HOST.
set -uo pipefail  # not -e: every path must reach the power-off decision

"""

_AFTER_VM = """\
#   exit 0 (completed), 1 (failed) or any other failure: powers the VM off (no idle GPU);
#   exit {paused} (paused) after a spot preemption: GCE stops the VM; to continue, run
#       {start}
#     and this script resumes the job from its newest committed checkpoint at boot;
#   exit {paused} for another reason (stop request, time budget): powers the VM off as well.
"""

_AFTER_MIG = """\
#   exit 0 (completed), 1 (failed) or any other failure: deletes the VM by resizing its
#     managed instance group {mig} to 0 (a VM that powered off would be recreated):
#       {resize}
#   exit {paused} (paused) after a spot preemption: GCE deletes the VM and the group
#     recreates it when spot capacity returns; this script then resumes the job from its
#     newest committed checkpoint;
#   exit {paused} for another reason (stop request, time budget): resizes the group to 0.
"""

_BODY = r"""
LOG_FILE="${COLABJOB_LOG_FILE:-/var/log/colabjob-startup.log}"
VENV="${COLABJOB_VENV:-/opt/colabjob/venv}"
SHUTDOWN_CMD="${COLABJOB_SHUTDOWN_CMD:-shutdown -h now}"
GPU_WAIT_S="${COLABJOB_GPU_WAIT_S:-900}"
RETRY_SLEEP_S="${COLABJOB_RETRY_SLEEP_S:-10}"
METADATA="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1"
JOB_PID=""
SIGNALLED=0
MIRROR_PID=""
MIRROR_KEEPALIVE=""
export HOME="${HOME:-/root}"
export PYTHONUNBUFFERED=1

log() {
  local line
  line="$(date -u +%Y-%m-%dT%H:%M:%SZ) colabjob-startup: $*"
  printf '%s\n' "$line" >>"$LOG_FILE"
  if [ -z "$MIRROR_PID" ]; then
    printf '%s\n' "$line"
  fi
}

start_mirror() {
  # stdout reaches the serial console and Cloud Logging through the guest agent. The job
  # writes to the file only, so a reader that dies can never break its writes; tail copies
  # the file to stdout from its current end (earlier boots' lines are not repeated) for as
  # long as the keep-alive process lives, then prints what is left and ends.
  local size
  size="$(stat -c %s "$LOG_FILE")"
  sleep infinity &
  MIRROR_KEEPALIVE=$!
  tail -c "+$((size + 1))" -F -s 0.1 --pid="$MIRROR_KEEPALIVE" "$LOG_FILE" 2>/dev/null &
  MIRROR_PID=$!
}

stop_mirror() {
  if [ -n "$MIRROR_PID" ]; then
    kill "$MIRROR_KEEPALIVE" 2>/dev/null
    wait "$MIRROR_KEEPALIVE" 2>/dev/null
    wait "$MIRROR_PID" 2>/dev/null
    MIRROR_PID=""
  fi
}

pip_install() {
  local attempt
  for attempt in 1 2 3; do
    if "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
      >>"$LOG_FILE" 2>&1; then
      return 0
    fi
    log "pip install $* failed (attempt $attempt of 3)"
    sleep "$((attempt * RETRY_SLEEP_S))"
  done
  return 1
}

installed_version() {
  "$VENV/bin/python" -c 'import colabjob; print(colabjob.__version__)' 2>/dev/null
}

install_colabjob() {
  if [ -x "$VENV/bin/colabjob" ] && [ "$(installed_version)" = "$COLABJOB_VERSION" ]; then
    log "colabjob $COLABJOB_VERSION is installed in $VENV"
    return 0
  fi
  local python="${COLABJOB_PYTHON:-}" candidate
  if [ -z "$python" ]; then
    for candidate in /opt/conda/bin/python3 python3; do
      if command -v "$candidate" >/dev/null 2>&1; then
        python="$candidate"
        break
      fi
    done
  fi
  if [ -z "$python" ]; then
    log "ERROR: no python3 on this image"
    return 1
  fi
  log "installing colabjob==$COLABJOB_VERSION into $VENV (with $python)"
  "$python" -m venv "$VENV" >>"$LOG_FILE" 2>&1 || return 1
  pip_install --upgrade pip || return 1
  if [ "$EXPECT_GPU" != 1 ]; then
    # No GPU: the CPU build of torch (~200 MB) instead of the default CUDA one (several GB).
    pip_install torch --index-url "$TORCH_CPU_INDEX" || return 1
  fi
  # With a GPU the default torch wheel from PyPI (Linux x86_64) bundles CUDA.
  pip_install "colabjob==$COLABJOB_VERSION" "${EXTRA_PACKAGES[@]}" || return 1
}

wait_for_gpu() {
  [ "$EXPECT_GPU" = 1 ] || return 0
  local waited=0
  # Deep Learning VM images install the NVIDIA driver during the first boot.
  until nvidia-smi -L >>"$LOG_FILE" 2>&1; do
    if [ "$waited" -ge "$GPU_WAIT_S" ]; then
      log "ERROR: no GPU visible after ${GPU_WAIT_S}s (nvidia-smi fails); not training on CPU"
      return 1
    fi
    sleep 10
    waited=$((waited + 10))
  done
}

forward_signal() {
  SIGNALLED=1
  log "got a shutdown signal: asking the job to commit a checkpoint and stop"
  if [ -n "$JOB_PID" ]; then
    kill -TERM "$JOB_PID" 2>/dev/null || true
  fi
}

run_job() {
  local rc=0 again
  if [ -n "$NOTIFY_SECRET" ]; then  # the URLs hold tokens: read at run time, never stored
    if COLABJOB_NOTIFY="$(gcloud secrets versions access latest --secret="$NOTIFY_SECRET" \
        --project "$PROJECT")"; then
      export COLABJOB_NOTIFY
    else
      log "could not read the secret $NOTIFY_SECRET (the VM's service account needs" \
        "roles/secretmanager.secretAccessor): no notifications this time"
    fi
  fi
  log "running: colabjob resume $JOB_URL --platform gce${RESUME_ARGS[*]:+ ${RESUME_ARGS[*]}}"
  SIGNALLED=0
  trap forward_signal TERM INT
  "$VENV/bin/colabjob" resume "$JOB_URL" --platform gce "${RESUME_ARGS[@]}" \
    >>"$LOG_FILE" 2>&1 &
  JOB_PID=$!
  if [ "$SIGNALLED" = 1 ]; then  # the signal came before the job existed
    kill -TERM "$JOB_PID" 2>/dev/null || true
  fi
  wait "$JOB_PID" || rc=$?
  # A trapped signal interrupts wait before the job has exited: wait again (bash keeps the
  # status of a job that ended meanwhile; 127: it was collected already).
  while [ "$SIGNALLED" = 1 ]; do
    SIGNALLED=0
    again=0
    wait "$JOB_PID" || again=$?
    if [ "$again" -ne 127 ]; then
      rc="$again"
    fi
  done
  trap - TERM INT
  return "$rc"
}

preempted() {
  local answer
  answer="$(curl -fsS --max-time 5 -H 'Metadata-Flavor: Google' \
    "$METADATA/instance/preempted" 2>/dev/null)" || return 1
  [ "$answer" = "TRUE" ]
}

restart_hint() {
  if [ -n "$MIG" ]; then
    log "to continue: gcloud compute instance-groups managed resize $MIG --size=1" \
      "--zone $ZONE --project $PROJECT (its new VM resumes the job at boot); from anywhere" \
      "else: colabjob resume $JOB_URL"
    log "when done, delete the group and its template: gcloud compute instance-groups" \
      "managed delete $MIG --zone $ZONE --project $PROJECT; gcloud compute" \
      "instance-templates delete $TEMPLATE --project $PROJECT"
    return
  fi
  log "to continue on this VM: gcloud compute instances start $INSTANCE --zone $ZONE" \
    "--project $PROJECT (this script resumes the job at boot); from anywhere else:" \
    "colabjob resume $JOB_URL"
  log "the stopped VM still bills its disk; delete it when done:" \
    "gcloud compute instances delete $INSTANCE --zone $ZONE --project $PROJECT"
}

power_off() {
  local cmd
  read -r -a cmd <<<"$SHUTDOWN_CMD"
  log "powering off: $SHUTDOWN_CMD"
  "${cmd[@]}" >>"$LOG_FILE" 2>&1 || log "ERROR: '$SHUTDOWN_CMD' failed; stop the VM by hand"
}

resize_group() {
  # A managed instance group recreates a VM that stops: shrink the group instead (it
  # deletes this VM and its disk). Only if that keeps failing, power off after all.
  local attempt
  for attempt in 1 2 3; do
    log "resizing the managed instance group $MIG to 0 (it deletes this VM)"
    if gcloud compute instance-groups managed resize "$MIG" --size=0 --zone "$ZONE" \
      --project "$PROJECT" >>"$LOG_FILE" 2>&1; then
      return 0
    fi
    log "the resize failed (attempt $attempt of 3)"
    sleep "$((attempt * RETRY_SLEEP_S))"
  done
  log "ERROR: could not resize $MIG to 0 (does the VM's service account have" \
    "roles/compute.instanceAdmin.v1?); the group may recreate this VM: run by hand" \
    "gcloud compute instance-groups managed resize $MIG --size=0 --zone $ZONE" \
    "--project $PROJECT"
  power_off
}

leave() {
  if [ -n "$MIG" ]; then
    resize_group
  else
    power_off
  fi
}

finish() {
  local rc="$1" preempted=0
  if [ "$rc" -eq "$EX_PAUSED" ] && preempted; then
    preempted=1
  fi
  stop_mirror  # from here on log() prints its lines itself
  if [ "$rc" -eq 0 ]; then
    log "job completed: $JOB_URL"
    leave
  elif [ "$preempted" = 1 ] && [ -n "$MIG" ]; then
    log "job paused with a committed checkpoint: this spot VM was preempted; the managed" \
      "instance group $MIG recreates it when spot capacity returns, and it resumes the job"
  elif [ "$preempted" = 1 ]; then
    log "job paused with a committed checkpoint: this spot VM was preempted; GCE stops it"
    restart_hint
  elif [ "$rc" -eq "$EX_PAUSED" ]; then
    log "job paused with a committed checkpoint (stop request or time budget)"
    restart_hint
    leave
  else
    log "job failed (exit $rc); see $LOG_FILE and: colabjob status $JOB_URL"
    restart_hint
    leave
  fi
}

main() {
  mkdir -p "$(dirname "$LOG_FILE")"
  touch "$LOG_FILE"
  start_mirror
  trap stop_mirror EXIT
  log "boot: job $JOB_URL on $INSTANCE${MIG:+ (group $MIG)} ($ZONE), colabjob $COLABJOB_VERSION"
  if ! install_colabjob; then
    log "ERROR: could not install colabjob==$COLABJOB_VERSION (see above)"
    finish 1
    return
  fi
  if ! wait_for_gpu; then
    finish 1
    return
  fi
  local rc=0
  run_job || rc=$?
  finish "$rc"
}

main "$@"
"""
