"""The embedded demo at its tiny size: stdlib text, a tokenizer trained on the spot, two
simulated sessions that each commit and resume, the loss falls, and the split run ends
bit-identical to the uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

from colabjob.jobs.demo import DEMO_SIZES, run_demo, stdlib_sources


def test_stdlib_selection_is_deterministic() -> None:
    a = stdlib_sources(5, 10**9)
    assert a == stdlib_sources(5, 10**9)
    assert [n for n, _ in a] == sorted(n for n, _ in a) and len(a) == 5
    assert sum(len(t) for _, t in stdlib_sources(50, 50_000)) <= 50_000 or len(
        stdlib_sources(50, 50_000)) == 1


def test_tiny_demo_resumes_exactly_and_the_loss_falls(tmp_path: Path) -> None:
    lines: list[str] = []
    report = run_demo(tmp_path, size="tiny", sessions=2, log=lines.append)
    assert [o.stop_reason for o in report.sessions] == ["budget", "completed"]
    assert report.sessions[0].checkpoint_step == DEMO_SIZES["tiny"].steps // 2
    assert report.identical is True
    assert report.first_loss is not None and report.last_loss is not None
    assert report.last_loss < report.first_loss - 0.2
    assert any("bit-identical" in line for line in lines)
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()


def test_a_weight_comparison_says_how_two_runs_differ(tmp_path: Path) -> None:
    """Against another job's checkpoint: the tensors that differ, by how much; a root with
    no checkpoint is 'not compared', never 'identical'."""
    from colabjob.jobs.demo import compare_final_weights

    run_demo(tmp_path / "a", size="tiny", sessions=1, compare=False, log=None)
    same = compare_final_weights(tmp_path / "a" / "job", tmp_path / "a" / "job")
    assert same and str(same).startswith("all ")
    lonely = compare_final_weights(tmp_path / "a" / "job", tmp_path / "nothing")
    assert not lonely and "no checkpoint" in str(lonely)
    small = DEMO_SIZES["tiny"].__class__(**{**DEMO_SIZES["tiny"].__dict__, "steps": 2})
    run_demo(tmp_path / "b", size=small, sessions=1, compare=False, log=None)
    other = compare_final_weights(tmp_path / "a" / "job", tmp_path / "b" / "job")
    assert not other and other.differing and other.max_abs > 0
    assert f"{len(other.differing)} of {other.total} tensors differ" in str(other)
