"""Where we run and how long the session may last: Colab, Kaggle, SLURM, GCE, local.

``describe_platform()`` detects the platform, estimates when the session started and when it
will end, and applies the user's overrides (``--platform``, ``--budget``,
``--session-started-at``), which always win. Every read of the outside world (environment
variables, ``/proc``, the GCE metadata server) goes through a ``HostProbe`` so tests inject
them. Known limits: Colab ~12 h free / 24 h Pro and Pro+ (not guaranteed, no warning), Kaggle
12 h (9 h on TPU), SLURM's projected end (``SLURM_JOB_END_TIME``), GCE spot: a 30 s notice.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import ConfigError

HOUR = 3600.0
PLATFORMS = ("colab", "kaggle", "slurm", "gce", "local")

#: Named budgets (session lengths); ``None`` means no limit.
PRESETS: Mapping[str, float | None] = {
    "colab": 12 * HOUR,
    "colab-free": 12 * HOUR,
    "colab-pro": 24 * HOUR,
    "colab-pro+": 24 * HOUR,
    "kaggle": 12 * HOUR,
    "kaggle-tpu": 9 * HOUR,
    "none": None,
    "unlimited": None,
}

_UNITS = {"d": 86400.0, "h": HOUR, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([dhms])")
_CLOCK = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?$")  # [D-]H:MM[:SS]


def parse_duration(text: str | float, *, what: str = "duration") -> float:
    """Seconds in ``"11h30m"``, ``"90m"``, ``"1.5h"``, ``"45s"``, ``"2d"`` or ``"11:30:00"``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{what} must not be negative, got {text}")
        return float(text)
    s = str(text).strip().lower().replace(" ", "")
    m = _CLOCK.match(s)
    if m:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
        return days * 86400.0 + hours * HOUR + minutes * 60.0 + seconds
    parts = _DURATION.findall(s)
    if s and parts and "".join(n + u for n, u in parts) == s:
        return sum(float(n) * _UNITS[u] for n, u in parts)
    hint = "use units, e.g. 11h30m, 90m, 45s, 1.5h, 2d, or H:MM:SS"
    if re.fullmatch(r"\d+(\.\d*)?", s):
        hint = f"add a unit: {s}m for minutes, {s}h for hours, {s}s for seconds"
    raise ConfigError(f"cannot read {what} {text!r}", hint=hint)


def parse_budget(text: str | float | None) -> float | None:
    """Session length in seconds from a duration or a preset name; None means no limit."""
    if text is None:
        return None
    if isinstance(text, str) and text.strip().lower() in PRESETS:
        return PRESETS[text.strip().lower()]
    try:
        return parse_duration(text, what="budget")
    except ConfigError as e:
        raise ConfigError(
            f"cannot read budget {text!r}",
            hint=f"a duration (11h30m, 90m) or one of: {', '.join(PRESETS)}",
        ) from e


def parse_timestamp(text: str | float, *, now: float) -> float:
    """Epoch seconds from a number, an ISO 8601 time (naive = local time) or ``"3h ago"``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    if s.lower().endswith("ago"):
        return now - parse_duration(s[:-3], what="session age")
    try:
        return float(s)
    except ValueError:
        pass
    try:
        return _dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError as e:
        raise ConfigError(
            f"cannot read time {text!r}",
            hint="use ISO 8601 (2025-01-31T09:30:00+00:00), epoch seconds, or e.g. '3h ago'",
        ) from e


# -- reading the host --------------------------------------------------------------------
def _read_uptime() -> float | None:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_container_age() -> float | None:
    """Seconds since PID 1 started: the container's age (equals the uptime on a plain VM)."""
    up = _read_uptime()
    try:
        with open("/proc/1/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = float(fields[19])  # field 22 of stat(5); fields[0] is field 3
        return None if up is None else max(0.0, up - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _colab_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def _dmi_says_gce() -> bool:
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return "Google Compute Engine" in f.read()
    except OSError:
        return False


def metadata_url(path: str, environ: Mapping[str, str] | None = None) -> str:
    """URL of a GCE metadata path; ``GCE_METADATA_HOST`` (host:port) redirects it in tests."""
    env = os.environ if environ is None else environ
    host = env.get("GCE_METADATA_HOST") or "metadata.google.internal"
    return f"http://{host}/computeMetadata/v1/{path.lstrip('/')}"


def metadata_get(
    path: str,
    *,
    environ: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    timeout: float = 2.0,
) -> tuple[str, str | None]:
    """``(body, etag)`` of a metadata path. Raises ``OSError`` when the server is unreachable."""
    url = metadata_url(path, environ)
    if params:
        url += "?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode().strip(), resp.headers.get("ETag")


def _gce_preemptible(environ: Mapping[str, str]) -> bool | None:
    try:
        body, _ = metadata_get("instance/scheduling/preemptible", environ=environ, timeout=1.0)
    except OSError:
        return None
    return body.strip().upper() == "TRUE"


@dataclass(frozen=True, kw_only=True)
class HostProbe:
    """Every outside read platform detection makes; tests build one with fakes."""

    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    uptime: Callable[[], float | None] = _read_uptime
    container_age: Callable[[], float | None] = _read_container_age
    colab_importable: Callable[[], bool] = _colab_importable
    dmi_says_gce: Callable[[], bool] = _dmi_says_gce
    gce_preemptible: Callable[[Mapping[str, str]], bool | None] = _gce_preemptible


@dataclass(frozen=True, kw_only=True)
class PlatformInfo:
    """What we know about this session. Times are wall-clock epoch seconds."""

    name: str
    tier: str | None = None
    limit: float | None = None  # session length; None: no known limit
    started_at: float | None = None
    deadline: float | None = None  # None: no known end (stop only on signals/notices)
    preemptible: bool = False
    notice_signals: tuple[str, ...] = ()
    source: str = ""  # where the deadline came from
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in PLATFORMS:
            raise ConfigError(
                f"unknown platform {self.name!r}", hint=f"one of: {', '.join(PLATFORMS)}"
            )

    def time_left(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now

    def describe(self, now: float) -> str:
        label = f"{self.name}-{self.tier}" if self.tier else self.name
        left = self.time_left(now)
        when = (
            "no session limit" if left is None else f"{format_duration(left)} left ({self.source})"
        )
        extra = ", preemptible" if self.preemptible else ""
        return f"{label}: {when}{extra}"


def format_duration(seconds: float) -> str:
    """``3h07m``, ``12m30s``, ``45s``; negative durations get a minus sign."""
    sign, s = ("-" if seconds < 0 else ""), round(abs(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{sign}{h}h{m:02d}m"
    return f"{sign}{m}m{sec:02d}s" if m else f"{sign}{sec}s"


def detect_platform(probe: HostProbe | None = None) -> tuple[str, str | None]:
    """``(name, tier)`` of the platform we run on, from the environment only (no network)."""
    p = probe or HostProbe()
    env = p.environ
    if env.get("SLURM_JOB_ID"):
        return "slurm", None
    if env.get("COLAB_RELEASE_TAG") or p.colab_importable():
        return "colab", "free"  # no API tells the tier; free (12 h) is the safe guess
    if env.get("KAGGLE_KERNEL_RUN_TYPE"):
        tpu = any(env.get(k) for k in ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "XRT_TPU_CONFIG"))
        return "kaggle", "tpu" if tpu else None
    if env.get("GCE_METADATA_HOST") or p.dmi_says_gce():
        return "gce", None
    return "local", None


def _split_platform(text: str) -> tuple[str, str | None]:
    s = text.strip().lower()
    if s in PLATFORMS:
        return s, ("free" if s == "colab" else None)
    name, _, tier = s.partition("-")
    if name in PLATFORMS and f"{name}-{tier}" in PRESETS:
        return name, tier
    choices = ", ".join([*PLATFORMS, "colab-pro", "colab-pro+", "kaggle-tpu"])
    raise ConfigError(f"unknown platform {text!r}", hint=f"one of: {choices}")


def _estimate_start(p: HostProbe, now: float, limit: float | None) -> tuple[float, str]:
    """Session start from the VM's uptime, else the container's age, else now."""
    for what, read in (("VM uptime", p.uptime), ("container age", p.container_age)):
        age = read()
        if age is not None and (limit is None or age < limit):
            return now - age, what
    return now, "process start (uptime longer than the session limit)"


def describe_platform(
    *,
    platform: str | None = None,
    budget: str | float | None = None,
    session_started_at: str | float | None = None,
    probe: HostProbe | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> PlatformInfo:
    """Detect the platform and its deadline, then apply the overrides (which always win)."""
    p = probe or HostProbe()
    env, now = p.environ, clock.time()
    name, tier = _split_platform(platform) if platform else detect_platform(p)
    limit: float | None = None
    started: float | None = None
    deadline: float | None = None
    source, notes, preemptible = "", [], False
    signals: tuple[str, ...] = ()

    if name in ("colab", "kaggle"):
        limit = PRESETS[f"{name}-{tier}" if tier else name]
        started, how = _estimate_start(p, now, limit)
        source = f"{name}{'-' + tier if tier else ''} limit from {how}"
        if name == "colab" and tier == "free" and budget is None:
            notes.append("assumed the free tier (12 h); pass --budget colab-pro for 24 h")
    elif name == "slurm":
        signals = ("SIGUSR1", "SIGTERM")
        started = _env_float(env, "SLURM_JOB_START_TIME")
        deadline = _env_float(env, "SLURM_JOB_END_TIME")
        if deadline is not None:
            source = "SLURM_JOB_END_TIME"
            limit = deadline - started if started is not None else None
        else:
            notes.append(
                "SLURM_JOB_END_TIME unset (Slurm < 23.02?): relying on signals; use --budget"
            )
    elif name == "gce":
        signals = ("SIGTERM",)
        preemptible = bool(p.gce_preemptible(env))
        if preemptible:
            notes.append("spot/preemptible VM: watching the preemption notice (30 s)")

    if budget is not None:
        limit = parse_budget(budget)
        source = f"--budget {budget}"
        deadline = None
    if session_started_at is not None:
        started = parse_timestamp(session_started_at, now=now)
        source += " from --session-started-at"
    if limit is not None and (name != "slurm" or budget is not None):
        started = now if started is None else started
        deadline = started + limit
    return PlatformInfo(
        name=name,
        tier=tier,
        limit=limit,
        started_at=started,
        deadline=deadline,
        preemptible=preemptible,
        notice_signals=signals,
        source=source.strip() or ("no limit" if deadline is None else ""),
        notes=tuple(notes),
    )


def _env_float(env: Mapping[str, str], key: str) -> float | None:
    try:
        return float(env[key])
    except (KeyError, ValueError):
        return None
