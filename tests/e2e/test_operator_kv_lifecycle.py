"""Issue 13 on the local control plane: idle conversations do not hold GPU memory.

A pool whose decoders hold N conversations' reservations receives 4N conversations whose turns are separated by
gaps longer than the resident TTL, with no end signal: none is refused or waits beyond one placement round;
offloads, reloads and re-prefills show in status and in /metrics; a restarted operator rebuilds every
conversation's KV state from the API server."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle
from conserve.testkit import NOT_YET, Api, OperatorProcess, conversation_body, wait_for

DECODERS = 2
CAPACITY = 10_000  # 9,500 after headroom: four reservations of 2,000 per decoder
PER_DECODER = 4
N = DECODERS * PER_DECODER
FIRST_INPUT = 1_000
RESIDENT_TTL_S = 2
GAP_S = RESIDENT_TTL_S + 2  # longer than the active window plus the resident TTL
HOST_TOKENS = 6 * 1_100  # host memory for six conversations per decoder: the rest are dropped (host pressure)


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def operator_args(metrics_port: int) -> list[str]:
    return ["--metrics-port", str(metrics_port)]


def statuses(api: Api) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: dict(c.get("status") or {}) for c in api.list_convs()}


def report_turn(api: Api, name: str, turns: int) -> None:
    """What the router reports after a turn: cumulative usage, the time of the turn."""
    usage = {
        "turns": turns,
        "inputTokens": FIRST_INPUT + 50 * (turns - 1),
        "outputTokens": 100 * turns,
        "lastTurnTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    api.patch_conv(name, {"usage": usage})


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
        return text


def metric_total(text: str, name: str, transition: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'transition="{transition}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_kv_lifecycle_4n_idle_conversations_placed_without_queueing_and_rebuilt_on_restart(
    api: Api, operator: OperatorProcess, cluster: ClusterHandle, namespace: str, tmp_path: Path, metrics_port: int
) -> None:
    lifecycle = {
        "hostKvTokensPerDecoder": HOST_TOKENS,
        "maxActiveWindowSeconds": 1,
        "maxResidentTtlSeconds": RESIDENT_TTL_S,
        "maxHostTtlSeconds": 3600,
    }
    api.create_fleet(DECODERS, CAPACITY, kvLifecycle=lifecycle)
    api.wait_ready_decoders(DECODERS)

    names = [f"c{i:02d}" for i in range(4 * N)]
    for wave in range(4):
        batch = names[wave * N : (wave + 1) * N]
        for name in batch:
            api.create(conversation_body(name, "llama", FIRST_INPUT))

        # One placement round: every conversation of the wave is placed, none waits for another's release.
        def wave_placed(b: list[str] = batch) -> bool:
            return all(api.conv_status(n).get("phase") == "Prefilling" for n in b)

        wait_for(f"wave {wave} placed", wave_placed, 15, tolerate=NOT_YET)
        for name in batch:
            report_turn(api, name, 1)
        time.sleep(GAP_S)  # no end signal: the wave goes idle, past the resident TTL
    assert api.events("NoCapacity") == [], "a conversation waited for capacity"

    # The first waves' KV went to host memory or, past its room, was dropped; every pin is kept.
    wait_for(
        "host memory full (six conversations per decoder)",
        lambda: sum(s.get("kvState") == "Offloaded" for s in statuses(api).values()) == DECODERS * 6,
        15,
        tolerate=NOT_YET,
    )
    states = statuses(api)
    assert all(s["decoder"]["pod"].startswith("dec-") and s["placementGeneration"] == 1 for s in states.values())
    assert sum(s["offloads"] for s in states.values()) >= 4 * N - 2  # all but the last wave's stragglers
    assert any(s.get("kvState") == "Dropped" for s in states.values())

    # Second turns: an offloaded conversation is reloaded, a dropped one prefilled again, on its own decoder.
    offloaded = next(n for n, s in states.items() if s.get("kvState") == "Offloaded")
    dropped = next(n for n, s in states.items() if s.get("kvState") == "Dropped")
    for name in (offloaded, dropped):
        report_turn(api, name, 2)
    wait_for("reload counted", lambda: api.conv_status(offloaded)["reloads"] == 1, tolerate=NOT_YET)
    wait_for("re-prefill counted", lambda: api.conv_status(dropped)["reprefills"] == 1, tolerate=NOT_YET)
    assert api.conv_status(offloaded)["decoder"]["pod"] == states[offloaded]["decoder"]["pod"]
    assert api.conv_status(dropped)["decoder"]["pod"] == states[dropped]["decoder"]["pod"]

    pool = wait_for(
        "offloaded conversations in the pool's status",
        lambda: (p := api.get_pool("llama")["status"]).get("offloadedConversations") and p,
        tolerate=NOT_YET,
    )
    assert pool["pendingConversations"] == 0
    assert sum(d["offloadedConversations"] for d in pool["decoders"]) == pool["offloadedConversations"]
    text = scrape(metrics_port)
    for transition in ("offloaded", "reloaded", "dropped", "reprefilled"):
        assert metric_total(text, "conserve_kv_lifecycle_transitions_total", transition) > 0, transition

    # Restart: every conversation's KV state and counters come back from the API server, unchanged.
    time.sleep(GAP_S + 1)  # let the two reloaded ones settle (offloaded again past the resident TTL)
    before = {n: (s.get("kvState"), s["offloads"], s["reloads"], s["reprefills"]) for n, s in statuses(api).items()}
    pool_before = api.get_pool("llama")["status"]
    operator.kill()
    operator.start()
    time.sleep(2)  # a few sweeps and a pool status write by the new run
    after = {n: (s.get("kvState"), s["offloads"], s["reloads"], s["reprefills"]) for n, s in statuses(api).items()}
    assert after == before
    pool_after = api.get_pool("llama")["status"]
    for key in ("conversations", "offloadedConversations", "droppedConversations", "pendingConversations"):
        assert pool_after[key] == pool_before[key], key
