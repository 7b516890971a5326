"""Host memory for checkpoints: how much the process may still use, and whether a background
(async) save fits in it.

A background checkpoint first copies the whole training state to host RAM so the loop can go
on; on a machine without that much free memory (a 0.5 B-parameter full fine-tune on free
Colab) the copy kills the kernel. ``available_bytes()`` reads what the process may still
allocate: ``MemAvailable`` from ``/proc/meminfo`` and, under a cgroup (what Colab and
containers enforce), the limit minus current usage (v2 ``memory.max``/``memory.current``,
v1 ``memory.limit_in_bytes``/``memory.usage_in_bytes``); the smallest wins. ``plan_save``
decides: ``"true"`` and ``"false"`` force a mode; ``"auto"`` saves in the background only
when a copy of the state fits with a margin, else synchronously, streaming tensor by tensor
(almost no extra memory; the loop waits for the write and upload). Host buffers a run keeps
for its background copies (``HostBuffers``: the pinned staging pool of a GPU run) count as
room for the next copy, and are released when saving turns synchronous. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

__all__ = [
    "ASYNC_MODES",
    "HostBuffers",
    "SaveChooser",
    "SavePlan",
    "available_bytes",
    "parse_async",
    "plan_save",
]

AsyncMode = Literal["auto", "true", "false"]
ASYNC_MODES: tuple[AsyncMode, ...] = ("auto", "true", "false")
MIN_MARGIN = 512 * 2**20  # left free besides the copy: the loop's own allocations go on
MARGIN_FRACTION = 0.25  # ... or a quarter of the state, whichever is more

Reader = Callable[[str], str | None]
_V1 = "/sys/fs/cgroup/memory/memory."


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None  # "max": no limit


def _meminfo_available(read: Reader) -> int | None:
    for line in (read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def _cgroup_room(read: Reader) -> int | None:
    rooms = []
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (_V1 + "limit_in_bytes", _V1 + "usage_in_bytes"),
    ):
        limit, usage = _int(read(limit_file)), _int(read(usage_file))
        if limit is not None and usage is not None and limit < 2**60:  # v1's "no limit"
            rooms.append(max(0, limit - usage))
    return min(rooms) if rooms else None


def available_bytes(read: Reader = _read) -> int | None:
    """Bytes this process may still allocate (see the module docstring); None if unknown."""
    found = [v for v in (_meminfo_available(read), _cgroup_room(read)) if v is not None]
    return min(found) if found else None


def parse_async(value: object) -> AsyncMode:
    """``checkpoint.async`` / ``async_checkpoint=``: True, False, or "auto" (and strings)."""
    if value is True or value is False:
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in ASYNC_MODES:
        return text
    raise ValueError(f"async checkpoint must be auto, true or false, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SavePlan:
    """How the next checkpoint is saved: in the background (``background``) or not, and
    why not (``reason``, a line for the log; ``why``, its short form for ``colabjob
    status``; None when async)."""

    background: bool
    reason: str | None = None
    why: str | None = None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def plan_save(mode: AsyncMode, state_bytes: int, available: int | None) -> SavePlan:
    """Background or synchronous save of ``state_bytes`` with ``available`` bytes free."""
    if mode == "true":
        return SavePlan(background=True)
    if mode == "false":
        return SavePlan(
            background=False,
            reason="checkpoint.async is false: saving synchronously",
            why="checkpoint.async is false",
        )
    if available is None:
        return SavePlan(background=True)  # nothing to go by: the documented default
    margin = max(MIN_MARGIN, int(MARGIN_FRACTION * state_bytes))
    if state_bytes + margin <= available:
        return SavePlan(background=True)
    return SavePlan(
        background=False,
        reason=(
            f"checkpoint: state {_gb(state_bytes)} does not fit twice in host memory "
            f"({_gb(available)} free); saving synchronously, tensor by tensor"
        ),
        why=f"state {_gb(state_bytes)} does not fit twice in host memory, {_gb(available)} free",
    )


class HostBuffers(Protocol):
    """Host memory a run keeps for its background copies (``StagingPool``)."""

    @property
    def nbytes(self) -> int: ...

    def clear(self) -> int: ...


class SaveChooser:
    """Decides each periodic checkpoint's mode (``plan_save`` with ``available_bytes()``
    read at that moment) and reports a change of mode once: a log line through ``say`` and
    ``{"checkpoint_mode": ...}`` through ``on_status`` (the heartbeat ``colabjob status``
    reads). ``buffers`` already held for the copies count as free for the next one; a
    synchronous save releases them (the log line says how much)."""

    def __init__(
        self,
        mode: AsyncMode,
        *,
        say: Callable[[str], None],
        on_status: Callable[[dict[str, object]], None] | None = None,
        buffers: HostBuffers | None = None,
        available: Callable[[], int | None] | None = None,
    ) -> None:
        self.mode = mode
        self._say, self._on_status = say, on_status
        self._buffers, self._available = buffers, available
        self._last: bool | None = None

    def background(self, state_bytes: int) -> bool:
        held = self._buffers.nbytes if self._buffers is not None else 0
        free = (self._available or available_bytes)()
        plan = plan_save(self.mode, state_bytes, None if free is None else free + held)
        freed = self._buffers.clear() if self._buffers is not None and not plan.background else 0
        if plan.background != self._last:
            if not plan.background and plan.reason:
                released = f"; released {_gb(freed)} of pinned staging buffers" if freed else ""
                self._say(plan.reason + released)
            elif self._last is not None:
                self._say("checkpoint: enough host memory again; saving in the background")
            if self._on_status is not None:
                status = "background" if plan.background else f"synchronous ({plan.why})"
                self._on_status({"checkpoint_mode": status})
            self._last = plan.background
        return plan.background
