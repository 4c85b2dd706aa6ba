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
    assert "conserve" in captured.out
    assert "round-robin" in captured.out
    payload = json.loads((out / "results.json").read_text())
    # 24 policies (4 ConServe variants, 10 baselines with the shared P/D decider (9 per-turn routers and llm-d's flow
    # control), the same 10 with their own) x 2 fleets
    assert len(payload["runs"]) == 48
    rules = {r["policy"]: r["pd_rule"] for r in payload["runs"]}
    assert rules["conserve"] == rules["dynamo-kv-router"] == "decider: auto"
    assert rules["dynamo-kv-router@native"].startswith("native: the decoder when it lacks under 1000 tokens")
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
    with pytest.raises(ValueError, match="must be positive"):
        scale_load(workload, 0.0)


# --- bad input: a clear message on stderr and a non-zero exit, in both commands ------------------------------


def _run(command: str, workload: Path, out: Path) -> int:
    return main([command, "--workload", str(workload), "--no-progress", "--out", str(out)])


@pytest.mark.parametrize("command", ["simulate", "bench"])
def test_missing_trace_says_file_not_found(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "gone.jsonl"
    assert _run(command, missing, tmp_path / "out") == 2
    assert f"{missing}: file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["simulate", "bench"])
def test_trace_dir_without_the_named_trace_says_file_not_found(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([command, "--workload", "mooncake", "--trace-dir", str(tmp_path), "--no-progress"])
    assert code == 2
    assert f"{tmp_path / 'mooncake' / 'conversation_trace.jsonl'}: file not found" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["simulate", "bench"])
def test_csv_not_in_azure_format_names_the_suffix_rule_and_missing_columns(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "requests.csv"
    path.write_text("arrival,input,GeneratedTokens\n0,100,10\n")
    assert _run(command, path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "read as an Azure trace (CSV) because its name ends in .csv" in err
    assert "lacks the column(s) TIMESTAMP, ContextTokens " in err


@pytest.mark.parametrize("command", ["simulate", "bench"])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_trace_with_every_line_malformed_stops(
    command: str, suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"broken{suffix}"
    header = "TIMESTAMP,ContextTokens,GeneratedTokens\n" if suffix == ".csv" else ""
    path.write_text(header + "not a request\nnor this\n")
    assert _run(command, path, tmp_path / "out") == 2
    captured = capsys.readouterr()
    assert f"{path}: read as " in captured.err
    assert "none of its 2 non-empty line(s) is a usable request (line " in captured.err
    assert "nan" not in captured.out.lower()  # no table of nothing
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["simulate", "bench"])
def test_window_with_no_conversation_stops(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--workload", str(_trace(tmp_path)), "--duration-s", "0", "--no-progress", "--out", str(tmp_path / "o")]
    assert main([command, *args]) == 2
    assert "has no conversation in its first 0 s" in capsys.readouterr().err


def test_bench_sweeps_loads_and_fleets(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["bench", "--workload", str(_trace(tmp_path)), "--policy", "conserve", "--policy", "sticky"]
    code = main([*args, "--sweep-load", "0.5,2", "--sweep-fleets", "--out", str(out), "--no-progress"])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    fleets = payload["meta"]["fleets"]
    # equal GPU count and equal decode TDP: 4 x H100 decode (2800 W) = 7 x H20 or A100 (400 W each)
    assert {"tiered", "homogeneous", "decode-h100x4", "decode-h20x4", "decode-h20x7-eqTDP"} <= set(fleets)
    assert {"decode-a100x7-eqTDP", "decode-h200x4"} <= set(fleets)
    assert "decode-h200x4-eqTDP" not in fleets
    assert {r["workload"] for r in payload["runs"]} == {"tiny@0.5x", "tiny@2x"}
    assert len(payload["runs"]) == 2 * 2 * len(fleets)
    assert (out / "load_sweep_tiny_tiered.png").stat().st_size > 0
    assert "## What every policy knows" in (out / "report.md").read_text()


def test_bench_refuses_a_bad_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--workload", str(_trace(tmp_path)), "--sweep-load", "1,fast", "--no-progress"])
    assert code == 2
    assert "--sweep-load: 'fast' is not a number" in capsys.readouterr().err
