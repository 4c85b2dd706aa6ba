"""`conserve simulate` and `conserve bench` end to end on a tiny trace: table, CSV, JSON and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conserve.cli import main
from conserve.sim.workload import load_workload, scale_load


def _trace(tmp_path: Path) -> Path:
    lines = [
        {"timestamp": 0, "input_length": 1500, "output_length": 40, "hash_ids": [0, 1, 2]},
        {"timestamp": 500, "input_length": 900, "output_length": 20, "hash_ids": [0, 5]},
        {"timestamp": 20_000, "input_length": 1600, "output_length": 30, "hash_ids": [0, 1, 2, 3]},
    ]
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    return path


def test_simulate_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "simulate",
            "--workload",
            str(_trace(tmp_path)),
            "--policy",
            "all",
            "--tier-mapping",
            "both",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "line 4: not JSON" in captured.err
    assert "conserve" in captured.out and "round-robin" in captured.out
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["runs"]) == 24  # 12 policies (3 ConServe variants, 9 baselines) x 2 fleets
    assert payload["meta"]["signals"] == {"tiny": {"end_of_conversation": False}}
    assert all(r["turns"] == 3 for r in payload["runs"])
    for name in (
        "runs.csv",
        "comparison.csv",
        "report.md",
        "ttfet_cdf_tiny.png",
        "summary_tiny.png",
        "energy_per_token_tiny.png",
    ):
        assert (out / name).stat().st_size > 0


def test_strict_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--workload", str(_trace(tmp_path)), "--strict", "--no-progress"])
    assert code == 2
    assert "tiny.jsonl:4" in capsys.readouterr().err


def test_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    code = main(["bench", "--workload", "agentic", "--duration-s", "20", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "ConServe vs the best per-turn baseline" in text
    assert "tier mapping gain" in text
    assert (out / "comparison.csv").is_file()


def test_scale_load(tmp_path: Path) -> None:
    workload = load_workload(str(_trace(tmp_path)))
    faster = scale_load(workload, 2.0)
    assert [c.arrival_s for c in faster.conversations] == [c.arrival_s / 2 for c in workload.conversations]
    assert faster.turns == workload.turns
    with pytest.raises(ValueError):
        scale_load(workload, 0.0)
