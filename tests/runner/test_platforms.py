"""Platform detection and session deadlines from injected environments, and the overrides."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from colabjob.errors import ConfigError
from colabjob.runner.platforms import (
    HOUR,
    HostProbe,
    describe_platform,
    detect_platform,
    format_duration,
    metadata_get,
    parse_budget,
    parse_duration,
    parse_timestamp,
)
from tests.fakes import FakeClock
from tests.runner.fake_metadata import fake_metadata

NOW = 1_700_000_000.0


def probe(
    env: Mapping[str, str] | None = None,
    *,
    uptime: float | None = 3600.0,
    container: float | None = None,
    colab: bool = False,
    dmi: bool = False,
    preemptible: bool | None = None,
) -> HostProbe:
    return HostProbe(
        environ=dict(env or {}),
        uptime=lambda: uptime,
        container_age=lambda: container,
        colab_importable=lambda: colab,
        dmi_says_gce=lambda: dmi,
        gce_preemptible=lambda _env: preemptible,
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("11h30m", 11.5 * HOUR),
        ("90m", 5400.0),
        ("45s", 45.0),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        ("1h 2m 3s", 3723.0),
        ("11:30:00", 11.5 * HOUR),
        ("1-02:00", 26 * HOUR),
        ("0:90", 5400.0),
        (600, 600.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "90", "ten minutes", "5x", "1h-2m", "h", "-5m"])
def test_parse_duration_errors_say_how(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text, what="budget")
    assert "cannot read budget" in str(info.value) and info.value.hint
    if text == "90":
        assert "90m" in info.value.hint


def test_parse_budget_presets() -> None:
    assert parse_budget("colab-free") == 12 * HOUR
    assert parse_budget("Colab-Pro") == 24 * HOUR
    assert parse_budget("kaggle-tpu") == 9 * HOUR
    assert parse_budget("none") is None and parse_budget(None) is None
    assert parse_budget("11h30m") == 11.5 * HOUR
    with pytest.raises(ConfigError, match="budget") as info:
        parse_budget("colab-platinum")
    assert "colab-pro" in (info.value.hint or "")


def test_parse_timestamp() -> None:
    assert parse_timestamp("3h ago", now=NOW) == NOW - 3 * HOUR
    assert parse_timestamp("2023-11-14T22:13:20+00:00", now=0) == NOW
    assert parse_timestamp("2023-11-14T22:13:20Z", now=0) == NOW
    assert parse_timestamp(str(NOW), now=0) == NOW
    with pytest.raises(ConfigError, match="cannot read time"):
        parse_timestamp("yesterday-ish", now=NOW)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"env": {"COLAB_RELEASE_TAG": "release-colab_20250101"}}, ("colab", "free")),
        ({"colab": True}, ("colab", "free")),
        ({"env": {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}}, ("kaggle", None)),
        ({"env": {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "TPU_NAME": "local"}}, ("kaggle", "tpu")),
        ({"env": {"SLURM_JOB_ID": "42", "COLAB_RELEASE_TAG": "x"}}, ("slurm", None)),
        ({"env": {"GCE_METADATA_HOST": "127.0.0.1:1"}}, ("gce", None)),
        ({"dmi": True}, ("gce", None)),
        ({}, ("local", None)),
    ],
)
def test_detect(kwargs: dict, expected: tuple[str, str | None]) -> None:
    assert detect_platform(probe(kwargs.pop("env", None), **kwargs)) == expected


def test_colab_deadline_from_uptime() -> None:
    clock = FakeClock(NOW)
    info = describe_platform(probe=probe({"COLAB_RELEASE_TAG": "x"}, uptime=2 * HOUR), clock=clock)
    assert (info.name, info.tier, info.limit) == ("colab", "free", 12 * HOUR)
    assert info.started_at == NOW - 2 * HOUR
    assert info.time_left(NOW) == 10 * HOUR
    assert "VM uptime" in info.source and any("colab-pro" in n for n in info.notes)
    assert info.describe(NOW).startswith("colab-free: 10h00m left")


def test_colab_overrides() -> None:
    clock = FakeClock(NOW)
    p = probe({"COLAB_RELEASE_TAG": "x"}, uptime=2 * HOUR)
    pro = describe_platform(probe=p, budget="colab-pro", clock=clock)
    assert pro.deadline == NOW + 22 * HOUR and not pro.notes
    own = describe_platform(probe=p, budget="11h30m", session_started_at="1h ago", clock=clock)
    assert own.deadline == NOW - HOUR + 11.5 * HOUR
    assert "--session-started-at" in own.source
    forced = describe_platform(probe=p, platform="colab-pro+", clock=clock)
    assert (forced.tier, forced.limit) == ("pro+", 24 * HOUR)
    unlimited = describe_platform(probe=p, budget="none", clock=clock)
    assert unlimited.deadline is None and unlimited.time_left(NOW) is None


def test_uptime_longer_than_the_limit_falls_back() -> None:
    clock = FakeClock(NOW)
    env = {"KAGGLE_KERNEL_RUN_TYPE": "Batch"}
    container = describe_platform(probe=probe(env, uptime=90 * HOUR, container=HOUR), clock=clock)
    assert container.started_at == NOW - HOUR and "container age" in container.source
    neither = describe_platform(
        probe=probe(env, uptime=90 * HOUR, container=80 * HOUR), clock=clock
    )
    assert neither.started_at == NOW and neither.deadline == NOW + 12 * HOUR
    tpu = describe_platform(probe=probe({**env, "TPU_NAME": "t"}, uptime=60.0), clock=clock)
    assert tpu.deadline == NOW - 60 + 9 * HOUR


def test_slurm() -> None:
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_START_TIME": str(NOW - 600),
        "SLURM_JOB_END_TIME": str(NOW + 3000),
    }
    info = describe_platform(probe=probe(env), clock=FakeClock(NOW))
    assert info.name == "slurm" and info.deadline == NOW + 3000 and info.limit == 3600
    assert info.notice_signals == ("SIGUSR1", "SIGTERM") and info.source == "SLURM_JOB_END_TIME"
    old = describe_platform(probe=probe({"SLURM_JOB_ID": "7"}), clock=FakeClock(NOW))
    assert old.deadline is None and any("--budget" in n for n in old.notes)
    capped = describe_platform(probe=probe(env), budget="30m", clock=FakeClock(NOW))
    assert capped.deadline == NOW - 600 + 1800


def test_gce_and_local() -> None:
    clock = FakeClock(NOW)
    spot = describe_platform(probe=probe({"GCE_METADATA_HOST": "x"}, preemptible=True), clock=clock)
    assert spot.name == "gce" and spot.preemptible and spot.deadline is None
    assert spot.describe(NOW) == "gce: no session limit, preemptible"
    local = describe_platform(probe=probe(), clock=clock)
    assert (local.name, local.deadline, local.preemptible) == ("local", None, False)
    budgeted = describe_platform(probe=probe(), budget="90m", clock=clock)
    assert budgeted.deadline == NOW + 5400  # a local budget counts from now


def test_unknown_platform_override() -> None:
    with pytest.raises(ConfigError, match="unknown platform") as info:
        describe_platform(probe=probe(), platform="azure")
    assert "kaggle-tpu" in (info.value.hint or "")


def test_metadata_server_reads_preemptible() -> None:
    with fake_metadata(preemptible=True) as fake:
        env = {"GCE_METADATA_HOST": fake.host}
        assert metadata_get("instance/scheduling/preemptible", environ=env)[0] == "TRUE"
        info = describe_platform(probe=HostProbe(environ=env), clock=FakeClock(NOW))
        assert info.name == "gce" and info.preemptible
        fake.preemptible = False
        assert not describe_platform(probe=HostProbe(environ=env), clock=FakeClock(NOW)).preemptible
        assert all("computeMetadata/v1/instance/scheduling/preemptible" in r for r in fake.requests)


def test_unreachable_metadata_server_means_not_preemptible() -> None:
    with fake_metadata() as fake:
        host = fake.host
    info = describe_platform(
        probe=HostProbe(environ={"GCE_METADATA_HOST": host}), clock=FakeClock(NOW)
    )
    assert info.name == "gce" and not info.preemptible


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45, "45s"), (750, "12m30s"), (11 * HOUR + 420, "11h07m"), (-90, "-1m30s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
