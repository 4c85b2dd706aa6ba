"""Trace parsing and conversation recovery (synthetic fixtures, plus the real traces kept in the repository)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conserve.sim.workload import (
    AZURE_FILE,
    MOONCAKE_FILE,
    AgenticParams,
    TraceError,
    default_trace_dir,
    load_workload,
    parse_azure_lines,
    parse_mooncake_lines,
    recover_conversations,
    synthesize_agentic,
)


def _line(ts: int, inp: int, out: int, hashes: list[int]) -> str:
    return json.dumps({"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": hashes})


MOONCAKE = [
    _line(0, 1500, 100, [0, 1, 2]),  # conversation A, turn 1: full blocks [0, 1] (1500 % 512 != 0)
    _line(0, 700, 50, [0, 9]),  # single turn B: only block 0 is full, so it can never be a parent
    _line(60_000, 1700, 80, [0, 1, 2, 3]),  # A turn 2: starts with A's full blocks [0, 1]
    _line(61_000, 1200, 10, [0, 9, 10]),  # [0, 9] is B's whole hash list but B has one full block only: new
    "{not json",
    _line(120_000, 2048, 20, [0, 1, 2, 3]),  # A turn 3 (2048 = 4 full blocks; [0,1,2] was turn 2's full prefix)
    json.dumps({"timestamp": 5, "input_length": -1, "output_length": 1, "hash_ids": []}),
    _line(130_000, 1600, 30, [0, 1, 2, 7]),  # a fork: each earlier turn it extends has a follow-up already: new
]


def test_mooncake_parse_reports_malformed_lines() -> None:
    requests, report = parse_mooncake_lines(MOONCAKE, path="fixture.jsonl")
    assert len(requests) == 6
    assert [n for n, _ in report.skipped] == [5, 7]
    assert "not JSON" in report.skipped[0][1]


def test_mooncake_strict_refuses() -> None:
    with pytest.raises(TraceError, match=r"fixture\.jsonl:5"):
        parse_mooncake_lines(MOONCAKE, path="fixture.jsonl", strict=True)


def test_mooncake_conversation_recovery() -> None:
    requests, _ = parse_mooncake_lines(MOONCAKE)
    conversations = recover_conversations(requests)
    shapes = sorted((len(c.turns), c.arrival_s) for c in conversations)
    assert shapes == [(1, 0.0), (1, 61.0), (1, 130.0), (3, 0.0)]
    a = next(c for c in conversations if len(c.turns) == 3)
    t1, t2, t3 = a.turns
    assert (t1.input_tokens, t1.new_tokens) == (1500, 1500)
    # turn 2 reuses turn 1's input and output (1600 tokens) and adds 100
    assert (t2.input_tokens, t2.new_tokens, t2.not_before_s) == (1700, 100, 60.0)
    # turn 3's prompt (2048) is shorter than turn 2's context (1780): it reuses 1780 and adds 268
    assert (t3.input_tokens, t3.new_tokens) == (2048, 268)
    # conservation: every request is exactly one turn
    assert sum(len(c.turns) for c in conversations) == len(requests)


AZURE = [
    "TIMESTAMP,ContextTokens,GeneratedTokens\n",
    "2023-11-16 18:15:46.6805900,374,44\n",
    "2023-11-16 18:15:50.9951690,396,109\n",
    "garbage,1,2\n",
    "2023-11-16 18:15:51.2224670,0,55\n",
]


def test_azure_single_turn_conversations() -> None:
    workload = parse_azure_lines(AZURE, path="az.csv")
    assert [c.turns[0].input_tokens for c in workload.conversations] == [374, 396]
    assert workload.conversations[1].arrival_s == pytest.approx(4.314579)
    assert workload.report is not None
    assert [n for n, _ in workload.report.skipped] == [4, 5]
    with pytest.raises(TraceError, match=r"az\.csv:4"):
        parse_azure_lines(AZURE, path="az.csv", strict=True)


def test_agentic_is_seeded_and_shaped() -> None:
    a = synthesize_agentic(7, 600.0)
    b = synthesize_agentic(7, 600.0)
    c = synthesize_agentic(8, 600.0)
    assert a == b
    assert a != c
    params = AgenticParams()
    for conv in a.conversations:
        visible = conv.first_visible_turn
        assert params.tool_turns_min <= visible <= params.tool_turns_max
        assert not any(t.user_visible for t in conv.turns[:visible])
        for prev, turn in zip(conv.turns, conv.turns[1:], strict=False):
            # the context grows: each prompt is the previous prompt, its output, and new tokens
            assert turn.input_tokens == prev.input_tokens + prev.output_tokens + turn.new_tokens
            assert turn.think_s > 0


def test_load_by_path(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(MOONCAKE) + "\n")
    workload = load_workload(str(path))
    assert workload.turns == 6
    with pytest.raises(TraceError):
        load_workload(str(tmp_path / "missing.jsonl"))


def test_duration_clips_turns(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(MOONCAKE) + "\n")
    workload = load_workload(str(path), duration_s=100)
    assert workload.turns == 4  # A's turns at 0 and 60 s, B, the request at 61 s


# --- the real traces kept in the repository (the `trace_dir` fixture fails, never skips, when they are missing) --


def test_real_mooncake_trace(trace_dir: Path) -> None:
    workload = load_workload("mooncake", trace_dir=trace_dir)
    assert workload.report is not None
    assert not workload.report.skipped
    assert workload.turns == 12_031
    follow_ups = workload.turns - len(workload.conversations)
    assert 0.28 < follow_ups / workload.turns < 0.38  # "about a third of requests are follow-up turns"
    new = sorted(t.new_tokens for c in workload.conversations for t in c.turns[1:])
    assert 10 < new[len(new) // 2] < 100  # "a median of a few dozen new tokens per follow-up turn"


def test_real_azure_trace(trace_dir: Path) -> None:
    workload = load_workload("azure", trace_dir=trace_dir)
    assert workload.report is not None
    assert not workload.report.skipped
    assert workload.turns == 19_366
    assert 3000 < workload.conversations[-1].arrival_s < 3700


@pytest.mark.parametrize("name", [MOONCAKE_FILE, AZURE_FILE])
def test_default_lookup_finds_the_traces_shipped_with_the_package(trace_dir: Path, name: str) -> None:
    # No --trace-dir: the installed package's own copy, which must be the repository's file.
    found = default_trace_dir() / name
    assert found.is_file(), f"the package does not ship {name} (package data?)"
    assert hashlib.sha256(found.read_bytes()).digest() == hashlib.sha256((trace_dir / name).read_bytes()).digest()


def test_each_trace_ships_with_its_license_and_attribution(trace_dir: Path) -> None:
    assert "Apache License" in (trace_dir / "mooncake" / "LICENSE-APACHE").read_text()
    cc_by = (trace_dir / "azure" / "LICENSE-CC-BY-4.0").read_text(encoding="utf-8-sig")
    assert "Attribution 4.0 International" in cc_by
    readme = (trace_dir / "README.md").read_text()
    for needed in ("github.com/kvcache-ai/Mooncake", "github.com/Azure/AzurePublicDataset", "Splitwise", "ISCA 2024"):
        assert needed in readme


def test_trace_dir_overrides_the_shipped_traces(tmp_path: Path) -> None:
    (tmp_path / "mooncake").mkdir()
    (tmp_path / MOONCAKE_FILE).write_text("\n".join(MOONCAKE) + "\n")
    assert load_workload("mooncake", trace_dir=tmp_path).turns == 6
    with pytest.raises(TraceError, match=r"AzureLLMInferenceTrace_conv\.csv: file not found"):
        load_workload("azure", trace_dir=tmp_path)


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


# --- bad input: each message names the file and says what is wrong -----------------------------------------


def test_missing_trace_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "trace.jsonl"
    with pytest.raises(TraceError) as exc:
        load_workload(str(missing))
    assert str(exc.value) == f"{missing}: file not found"


def test_csv_not_in_azure_format_says_why_it_was_read_as_azure(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("time,prompt_tokens,GeneratedTokens\n1,2,3\n")
    with pytest.raises(TraceError) as exc:
        load_workload(str(path))
    message = str(exc.value)
    assert message.startswith(f"{path}: read as an Azure trace (CSV) because its name ends in .csv")
    assert "lacks the column(s) TIMESTAMP, ContextTokens" in message
    assert "it has: time, prompt_tokens, GeneratedTokens" in message


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("all-bad.jsonl", '{not json\n{"timestamp": 1}\n\n[1, 2]\n', "none of its 3 non-empty line(s)"),
        ("all-bad.csv", f"{AZURE_HEADER}yesterday,1,2\n2023-11-16 18:15:46,0,5\n", "none of its 2"),
        ("empty.jsonl", "\n\n", "it holds no request"),
        ("header-only.csv", AZURE_HEADER, "it holds no request"),
    ],
)
def test_a_trace_without_one_usable_request_is_refused(tmp_path: Path, name: str, text: str, reason: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError) as exc:
        load_workload(str(path))
    assert str(exc.value).startswith(f"{path}: read as ")
    assert reason in str(exc.value)
