"""Scale scenarios of `operator_bench.py` (not a test): API writes per placement and per turn, and placement
throughput with 1, 2 and 4 operator replicas sharded by pool.

- Writes per placement are counted by the API server itself (`apiserver_request_total` before and after, every
  write verb on conversations, conversations/status, decoderpools/status and events; the client's creates and
  Leases excluded), so the same figure is measured for any operator version.
- Writes per turn replay a seeded workload (the simulator's agentic one: tool calls seconds apart, user
  follow-ups tens of seconds apart), with decode at 20 ms per output token, through the rules the code runs:
  `usage_writes_per_turn`, spec.usage patches (`router.policy.UsageBatcher`, flushed on the router's tick), each
  but the last one followed by the operator's status write; `stream_writes_per_turn`, turns streamed to the
  operator (issue 29), the end too (acknowledged, so no spec patch): the status writes `controller.usage_intake`'s
  `Checkpoints` asks for (the live context past the reservation held, phase Idle left, a checkpoint due),
  the reservation grown in place by the prior growth factor. The release's status write at the end is in both
  paths and not counted. It is not a run of the router against the API server (the e2e test
  tests/e2e/test_usage_stream.py checks that no write follows a turn).
"""

from __future__ import annotations

import concurrent.futures
import heapq
import math
import re
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import urllib3

from conserve.api.common import GROUP, VERSION
from conserve.api.conversation import PLURAL
from conserve.controller.shards import shard_of
from conserve.controller.usage_intake import CHECKPOINT_INTERVAL_S, Checkpoints
from conserve.core.reservation import PRIOR_GROWTH_FACTOR
from conserve.kube import ApiError
from conserve.kube.clients import CoordinationV1Api, CoreV1Api, CustomObjectsApi, k8s
from conserve.router.policy import Usage, UsageBatcher
from conserve.sim.workload import synthesize_agentic
from conserve.testkit import Api, OperatorProcess, conversation_body, pod_body, pool_body, wait_for

WRITE_VERBS = ("POST", "PATCH", "PUT", "DELETE")
SECONDS_PER_OUTPUT_TOKEN = 0.02


class PlacementWatch:
    """Records when each conversation's status first carries a decoder (watch event receipt time)."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.placed: dict[str, float] = {}
        self._api = CustomObjectsApi(api_client)
        self._namespace = namespace
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> PlacementWatch:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        self._ready.set()
        while not self._stop.is_set():
            watch = k8s("watch").Watch()
            try:
                for event in watch.stream(
                    self._api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self._namespace,
                    PLURAL,
                    timeout_seconds=600,
                ):
                    obj = event["object"]
                    if isinstance(obj, dict) and (obj.get("status") or {}).get("decoder"):
                        self.placed.setdefault(obj["metadata"]["name"], time.time())
                    if self._stop.is_set():
                        watch.stop()
                        return
            except (ApiError, urllib3.exceptions.HTTPError, OSError) as exc:  # a 410/504, a reset: list again
                print(f"watch restarted: {exc}", file=sys.stderr)

    def wait(self, names: list[str], timeout_s: float) -> bool:
        """Whether every one of `names` was placed within `timeout_s`."""
        try:
            wait_for(f"{len(names)} placements", lambda: all(n in self.placed for n in names), timeout_s, 0.05)
        except TimeoutError:
            return False
        return True


def make_namespace(core: Any, name: str) -> None:
    core.create_namespace({"metadata": {"name": name}})
    wait_for(
        f"the default ServiceAccount of {name}",
        lambda: core.read_namespaced_service_account("default", name),
        30,
        tolerate=(ApiError,),
    )


def apiserver_writes(api_client: Any) -> dict[str, float]:
    """Cumulative writes the API server has served, by resource[/subresource] (creates of conversations apart)."""
    cfg = api_client.configuration
    headers = {}
    for setting in cfg.auth_settings().values():  # a bearer token, when the kubeconfig has one (else client certs)
        headers[setting["key"]] = setting["value"]
    resp = api_client.rest_client.request("GET", f"{cfg.host}/metrics", headers=headers)
    text = resp.read().decode()
    if resp.status != 200:
        raise RuntimeError(f"API server /metrics: {resp.status} {text[:200]}")
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        body, _, value = line.rpartition("} ")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', body))
        if labels.get("verb") not in WRITE_VERBS:
            continue
        resource = labels.get("resource", "")
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        if resource == "conversations" and labels.get("verb") == "POST":
            resource = "conversations(create)"
        out[resource] += float(value.split()[0])
    return dict(out)


OPERATOR_RESOURCES = ("conversations", "conversations/status", "decoderpools/status", "events")


def operator_writes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {r: after.get(r, 0.0) - before.get(r, 0.0) for r in OPERATOR_RESOURCES}


def usage_writes_per_turn(interval_s: float, seed: int = 1, duration_s: float = 600.0) -> dict[str, Any]:
    """Patches the router's UsageBatcher sends per turn (the final one with `completed` included)."""
    workload = synthesize_agentic(seed, duration_s)
    tick = min(interval_s / 2, 0.25)  # the router's flush loop period (router/service.py)
    turns = patches = 0
    for conv in workload.conversations:
        batcher = UsageBatcher(interval_s)
        # (time, order, what): records at the end of each turn, completion after the last.
        actions: list[tuple[float, int, str]] = []
        t = conv.arrival_s
        for i, turn in enumerate(conv.turns):
            t += (turn.think_s if i else 0.0) + turn.output_tokens * SECONDS_PER_OUTPUT_TOKEN
            actions.append((t, i, "record"))
        actions.append((t, len(conv.turns), "complete"))
        checks: list[float] = []
        n = 0
        for at, _, what in actions:
            # The flush ticks between the previous action and this one.
            while checks and checks[0] <= at:
                now = heapq.heappop(checks)
                sent = batcher.due(now)
                patches += len(sent)
                if sent:
                    heapq.heappush(checks, math.ceil((now + interval_s) / tick) * tick)
            if what == "record":
                n += 1
                batcher.record(conv.key, Usage(n, n, n, "", None))
            else:
                batcher.complete(conv.key)
            heapq.heappush(checks, math.ceil(at / tick) * tick + tick)
        while len(batcher):
            now = heapq.heappop(checks)
            sent = batcher.due(now)
            patches += len(sent)
            if sent and len(batcher):
                heapq.heappush(checks, math.ceil((now + interval_s) / tick) * tick)
        turns += len(conv.turns)
    conversations = len(workload.conversations)
    status_writes = patches - conversations  # each patch but the last (with completed) changes the status
    return {
        "usage_interval_s": interval_s,
        "workload": f"agentic seed {seed}, {duration_s:g} s",
        "conversations": conversations,
        "turns": turns,
        "usage_patches": patches,
        "writes_per_turn": round(patches / turns, 3),
        "status_writes_after_patches": status_writes,
        "writes_per_turn_with_status": round((patches + status_writes) / turns, 3),
    }


def stream_writes_per_turn(
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    seed: int = 1,
    duration_s: float = 600.0,
    idle_phase_after_s: float = 60.0,
) -> dict[str, Any]:
    """API writes the turns cause when they are streamed to the operator (the end too, acknowledged: no spec
    patch): the status writes `Checkpoints` asks for."""
    workload = synthesize_agentic(seed, duration_s)
    turns = checkpoints_written = outgrowth_or_decision = 0
    for conv in workload.conversations:
        policy = Checkpoints(checkpoint_interval_s)
        key = conv.key
        reserved = math.ceil(conv.turns[0].input_tokens * PRIOR_GROWTH_FACTOR)  # placed: written
        t = conv.arrival_s
        last_end: float | None = None
        for i, turn in enumerate(conv.turns):
            start = t + (turn.think_s if i else 0.0)
            t = start + turn.output_tokens * SECONDS_PER_OUTPUT_TOKEN
            for _ in policy.due(t):  # written by the checkpoint loop between the turns
                policy.settled(key)
                checkpoints_written += 1
            live = turn.input_tokens + turn.output_tokens
            before = reserved
            reserved = max(reserved, math.ceil(live * PRIOR_GROWTH_FACTOR))  # grown in place (room assumed)
            back_from_idle = last_end is not None and start - last_end >= idle_phase_after_s
            if policy.must_write(key, t, decided=back_from_idle, outgrown=live > before):
                outgrowth_or_decision += 1
            last_end = t
        turns += len(conv.turns)
    writes = checkpoints_written + outgrowth_or_decision
    return {
        "checkpoint_interval_s": checkpoint_interval_s,
        "workload": f"agentic seed {seed}, {duration_s:g} s",
        "conversations": len(workload.conversations),
        "turns": turns,
        "status_writes_outgrowth_or_decision": outgrowth_or_decision,
        "status_writes_checkpoint": checkpoints_written,
        "writes_per_turn": round(writes / turns, 3),
    }


def spread_pools(namespace: str, shards: int) -> list[str]:
    """One pool per shard (names chosen by their hash, so each shard has one)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < shards:
        found.setdefault(shard_of(namespace, f"bench-{i}", shards), f"bench-{i}")
        i += 1
    return [found[s] for s in range(shards)]


def shard_holders(api_client: Any, namespace: str, prefix: str) -> dict[str, str]:
    leases = CoordinationV1Api(api_client).list_namespaced_lease(namespace).items
    return {
        lease.metadata.name: lease.spec.holder_identity or ""
        for lease in leases
        if lease.metadata.name.startswith(f"{prefix}-shard-")
    }


def shards_balanced(api_client: Any, namespace: str, shards: int, replicas: int) -> bool:
    """Every shard held, by every replica, none holding more than its fair share."""
    held = shard_holders(api_client, namespace, "bench")
    per: dict[str, int] = defaultdict(int)
    for holder in held.values():
        per[holder] += 1
    share = math.ceil(shards / replicas)
    return len(held) == shards and all(held.values()) and len(per) == replicas and max(per.values()) <= share


def phase_counts(api: Api) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for c in api.list_convs():
        counts[(c.get("status") or {}).get("phase") or "none"] += 1
    return counts


def scenario_replicas(
    api_client: Any,
    kubeconfig: Path,
    replicas: int,
    count: int,
    nodes_: list[str],
    work: Path,
    threads: int,
    *,
    shards: int = 4,
    decoders_per_pool: int = 5,
) -> dict[str, Any]:
    """Capacity arrives for a backlog: `count` conversations wait (Pending, no decoder) in `shards` pools led by
    `replicas` sharded operators; then every pool's decoders appear at once, and the operators place the backlog.
    Placements/s from the first decoder created to the last placement seen."""
    ns = f"bench-rep-{replicas}"
    make_namespace(CoreV1Api(api_client), ns)
    api = Api(api_client, ns)
    pools = spread_pools(ns, shards)
    for i, pool in enumerate(pools):
        api.create(pool_body(pool, app=f"dec-{i}", tokens_per_decoder=1_000_000))
    args = ["--lease-name", "bench", "--lease-namespace", ns, "--shards", str(shards)]
    ops = [
        OperatorProcess(kubeconfig, ns, work / f"{ns}-{r}.log", [*args, "--identity", f"r{r}"], fast=False)
        for r in range(replicas)
    ]
    try:
        for op in ops:
            op.start(wait_ready=False)
        wait_for(
            f"shards balanced over {replicas} replicas",
            lambda: shards_balanced(api_client, ns, shards, replicas),
            90,
            0.5,
        )
        names = [f"r-{i:05d}" for i in range(count)]
        with concurrent.futures.ThreadPoolExecutor(threads) as executor:
            list(executor.map(lambda i: api.create(conversation_body(names[i], pools[i % shards], 1000)), range(count)))
        wait_for(f"{count} conversations Pending", lambda: phase_counts(api).get("Pending", 0) >= count, 300, 0.5)
        before = apiserver_writes(api_client)
        with PlacementWatch(api_client, ns) as watch:
            t0 = time.time()
            with concurrent.futures.ThreadPoolExecutor(threads) as executor:
                list(
                    executor.map(
                        lambda j: api.create(
                            pod_body(f"dec-{j}", nodes_[j % len(nodes_)], app=f"dec-{j // decoders_per_pool}")
                        ),
                        range(shards * decoders_per_pool),
                    )
                )
            ok = watch.wait(names, 300)
            span = max(watch.placed.values()) - t0
        time.sleep(2)  # the last status writes and Event summaries land
        writes = operator_writes(before, apiserver_writes(api_client))
    finally:
        for op in ops:
            op.stop()
    return {
        "replicas": replicas,
        "shards": shards,
        "conversations": count,
        "all_placed": ok,
        "placements_per_s": round(count / span, 1),
        "writes": writes,
        "writes_per_placement": round(sum(writes.values()) / count, 3),
    }
