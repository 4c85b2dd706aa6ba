"""Operator benchmark on the local control plane (not a test): placement latency, throughput, memory.

    .venv/bin/python benchmarks/operator_bench.py [--kubeconfig K] [--out results/operator_bench.json]

Without --kubeconfig it starts its own LocalCluster with the API server's in-flight limits and priority and
fairness off (load-test settings). Scenarios:

1. latency at 50 and 200 creations/s (open loop, paced): creation (just before the create call) to the status
   written (the watch event that carries status.decoder), p50/p99; `conserve operator` runs as a subprocess;
2. throughput: N creations as fast as the client can (same threads), time until every one is placed, against
   the API server's own ceiling measured in the same run with the same client: create plus status patch of a
   bare custom object (a Conversation in a namespace no operator watches);
3. memory: the operator's RSS with 10,000 conversations placed over 1,000 decoder pods.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conserve.api.common import GROUP, VERSION
from conserve.api.conversation import PLURAL
from conserve.controller.usage_intake import CHECKPOINT_INTERVAL_S
from conserve.devcluster import build, nodes
from conserve.devcluster.cluster import LocalCluster
from conserve.kube import MERGE_PATCH
from conserve.kube.clients import CoreV1Api, CustomObjectsApi
from conserve.router.service import RouterConfig
from conserve.testkit import Api, OperatorProcess, conversation_body, install_crds, pod_body, pool_body

sys.path.insert(0, str(Path(__file__).resolve().parent))
from operator_scale import (
    PlacementWatch as PlacementWatch,
)
from operator_scale import (
    apiserver_writes,
    operator_writes,
    scenario_replicas,
    stream_writes_per_turn,
    usage_writes_per_turn,
)
from operator_scale import (
    make_namespace as make_namespace,
)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def setup_pool(api: Api, decoders: int, tokens: int, node_names: list[str], threads: int) -> None:
    api.create(pool_body("bench", tokens_per_decoder=tokens))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: api.create(pod_body(f"dec-{i}", node_names[i % len(node_names)])), range(decoders)))
    api.wait_ready_decoders(decoders, "bench", timeout_s=120)


def namespace_api(api_client: Any, ns: str) -> Api:
    """A new namespace for one scenario, and the calls into it."""
    make_namespace(CoreV1Api(api_client), ns)
    return Api(api_client, ns)


@contextmanager
def operator_running(kubeconfig: Path, api: Api, work: Path) -> Iterator[OperatorProcess]:
    """`conserve operator` (the command's own intervals) for the namespace of `api`, stopped at the end."""
    op = OperatorProcess(kubeconfig, api.namespace, work / f"{api.namespace}.log", fast=False).start()
    try:
        yield op
    finally:
        op.stop()


def paced_creations(api: Api, rate: float, count: int, threads: int, prefix: str) -> dict[str, float]:
    started: dict[str, float] = {}
    t0 = time.time() + 0.2

    def one(i: int) -> None:
        due = t0 + i / rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        name = f"{prefix}-{i:05d}"
        started[name] = time.time()
        api.create(conversation_body(name, "bench", 1000))

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    return started


def scenario_latency(
    api_client: Any, kubeconfig: Path, rate: float, count: int, nodes_: list[str], work: Path, threads: int
) -> dict[str, Any]:
    api = namespace_api(api_client, f"bench-lat-{int(rate)}")
    with operator_running(kubeconfig, api, work) as op:
        setup_pool(api, 20, 1_000_000, nodes_, threads)
        cpu0 = cpu_s(op)
        writes0 = apiserver_writes(api_client)
        with PlacementWatch(api_client, api.namespace) as watch:
            started = paced_creations(api, rate, count, threads, "c")
            achieved = count / (max(started.values()) - min(started.values()))
            ok = watch.wait(list(started), 120)
            lat = [watch.placed[n] - t for n, t in started.items() if n in watch.placed]
        time.sleep(2)  # the pool status and the Event summaries that follow the last placement
        writes = operator_writes(writes0, apiserver_writes(api_client))
        rss = rss_mib(op)
        cpu_ms = (cpu_s(op) - cpu0) * 1000 / count
    return {
        "rate_target_per_s": rate,
        "rate_achieved_per_s": round(achieved, 1),
        "conversations": count,
        "all_placed": ok,
        "placement_p50_s": round(quantile(lat, 0.50), 4),
        "placement_p99_s": round(quantile(lat, 0.99), 4),
        "writes": writes,
        "writes_per_placement": round(sum(writes.values()) / count, 3),
        "p50_ms": round(quantile(lat, 0.50) * 1000, 1),
        "p90_ms": round(quantile(lat, 0.90) * 1000, 1),
        "p99_ms": round(quantile(lat, 0.99) * 1000, 1),
        "max_ms": round(max(lat) * 1000, 1),
        "mean_ms": round(statistics.mean(lat) * 1000, 1),
        "operator_rss_mib": rss,
        "operator_cpu_ms_per_conversation": round(cpu_ms, 2),
        "load_average_1m_after": load_average(),
    }


def scenario_throughput(
    api_client: Any, kubeconfig: Path, count: int, nodes_: list[str], work: Path, threads: int
) -> dict[str, Any]:
    custom = CustomObjectsApi(api_client)
    # The ceiling: create + status patch of a bare object, nobody watching, same client and threads.
    make_namespace(CoreV1Api(api_client), "bench-ceiling")

    def bare(i: int) -> None:
        body = conversation_body(f"bare-{i:05d}", "none", 1000)
        custom.create_namespaced_custom_object(GROUP, VERSION, "bench-ceiling", PLURAL, body)
        custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            "bench-ceiling",
            PLURAL,
            f"bare-{i:05d}",
            {"status": {"phase": "Prefilling", "decoder": {"pod": "dec-0"}, "reservedKvTokens": 2000}},
            **MERGE_PATCH,
        )

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(bare, range(count)))
    ceiling = count / (time.time() - t0)

    api = namespace_api(api_client, "bench-throughput")
    with operator_running(kubeconfig, api, work):
        setup_pool(api, 20, 1_000_000, nodes_, threads)
        with PlacementWatch(api_client, api.namespace) as watch:
            names = [f"t-{i:05d}" for i in range(count)]
            t0 = time.time()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda n: api.create(conversation_body(n, "bench", 1000)), names))
            created_s = time.time() - t0
            ok = watch.wait(names, 300)
            placed_s = max(watch.placed[n] for n in names if n in watch.placed) - t0
    throughput = count / placed_s

    backlog = scenario_backlog(api_client, kubeconfig, count, nodes_, work, threads, "bench-backlog", [])
    quiet = scenario_backlog(
        api_client, kubeconfig, count, nodes_, work, threads, "bench-backlog-quiet", ["--events", "warnings"]
    )
    return {
        "conversations": count,
        "client_threads": threads,
        "ceiling_create_plus_status_per_s": round(ceiling, 1),
        "creations_per_s": round(count / created_s, 1),
        "placements_per_s": round(throughput, 1),
        "ratio_to_ceiling": round(throughput / ceiling, 3),
        "all_placed": ok,
        "backlog": {**backlog, "ratio_to_ceiling": round(backlog["placements_per_s"] / ceiling, 3)},
        "backlog_events_warnings_only": {**quiet, "ratio_to_ceiling": round(quiet["placements_per_s"] / ceiling, 3)},
        "load_average_1m_after": load_average(),
    }


def scenario_backlog(
    api_client: Any,
    kubeconfig: Path,
    count: int,
    nodes_: list[str],
    work: Path,
    threads: int,
    ns: str,
    extra: list[str],
) -> dict[str, Any]:
    """Backlog: the conversations exist before the operator starts (as after an outage), so the operator's own
    pace of placing them is not bounded by how fast a client creates."""
    api = namespace_api(api_client, ns)
    api.create(pool_body("bench", tokens_per_decoder=1_000_000))
    names = [f"b-{i:05d}" for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: api.create(pod_body(f"dec-{i}", nodes_[i % len(nodes_)])), range(20)))
        list(pool.map(lambda n: api.create(conversation_body(n, "bench", 1000)), names))
    op = OperatorProcess(kubeconfig, ns, work / f"{ns}.log", extra, fast=False)
    writes0 = apiserver_writes(api_client)
    with PlacementWatch(api_client, ns) as watch:
        op.start(wait_ready=False)
        try:
            ok = watch.wait(names, 300)
            span = max(watch.placed.values()) - min(watch.placed.values())
            cpu = cpu_s(op)
            time.sleep(2)
            writes = operator_writes(writes0, apiserver_writes(api_client))
        finally:
            op.stop()
    return {
        "operator_args": extra,
        "all_placed": ok,
        "placements_per_s": round(count / span, 1),
        "writes": writes,
        "writes_per_placement": round(sum(writes.values()) / count, 3),
        "operator_cpu_ms_per_conversation_incl_start": round(cpu * 1000 / count, 2),
    }


def scenario_memory(
    api_client: Any, kubeconfig: Path, conversations: int, decoders: int, nodes_: list[str], work: Path, threads: int
) -> dict[str, Any]:
    api = namespace_api(api_client, "bench-memory")
    with operator_running(kubeconfig, api, work) as op:
        rss_idle = rss_mib(op)
        setup_pool(api, decoders, 100_000, nodes_, threads)
        rss_pods = rss_mib(op)
        with PlacementWatch(api_client, api.namespace) as watch:
            names = [f"m-{i:05d}" for i in range(conversations)]
            t0 = time.time()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda n: api.create(conversation_body(n, "bench", 1000)), names))
            ok = watch.wait(names, 600)
            elapsed = time.time() - t0
        time.sleep(2)
        rss = rss_mib(op)
        time.sleep(40)  # steady state: Kopf's idle workers gone, freed heap trimmed (every 30 s)
        rss_steady = rss_mib(op)
        # A restart rebuilds the ledger from 10,000 statuses: how long, and how much memory then.
        op.stop()
        t_restart = time.time()
        op.start(timeout_s=120)
        rebuild_s = time.time() - t_restart
        time.sleep(3)
        rss_restarted = rss_mib(op)
    return {
        "conversations": conversations,
        "decoders": decoders,
        "all_placed": ok,
        "seconds_to_place_all": round(elapsed, 1),
        "operator_rss_mib_idle": rss_idle,
        "operator_rss_mib_with_decoders": rss_pods,
        "operator_rss_mib": rss,
        "operator_rss_mib_40s_later": rss_steady,
        "restart_to_ready_s": round(rebuild_s, 2),
        "operator_rss_mib_after_restart": rss_restarted,
    }


def cpu_s(op: OperatorProcess) -> float:
    """User + system CPU seconds the operator process has used."""
    assert op.proc is not None
    fields = Path(f"/proc/{op.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def rss_mib(op: OperatorProcess) -> float:
    assert op.proc is not None
    for line in Path(f"/proc/{op.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


@contextmanager
def cluster(kubeconfig: str | None, work: Path) -> Iterator[Path]:
    if kubeconfig:
        yield Path(kubeconfig)
        return
    build.build_all()
    with LocalCluster(work / "cluster", unlimited_inflight=True) as local:
        names = nodes.apply_gpu_nodes(local.kubeconfig, nodes.load_node_specs())
        nodes.wait_nodes_ready(local.kubeconfig, names)
        yield local.kubeconfig


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the scale issue asks for, flat."""
    out: dict[str, Any] = {}
    for run in results.get("latency", []):
        rate = int(run["rate_target_per_s"])
        out[f"placement_p50_s_at_{rate}"] = run["placement_p50_s"]
        out[f"placement_p99_s_at_{rate}"] = run["placement_p99_s"]
        out[f"rate_achieved_per_s_at_{rate}"] = run["rate_achieved_per_s"]
        out[f"writes_per_placement_at_{rate}"] = run["writes_per_placement"]
    throughput = results.get("throughput")
    ceiling = throughput["ceiling_create_plus_status_per_s"] if throughput else None
    if throughput:
        out["ceiling_create_plus_status_per_s"] = ceiling
        out["throughput_ratio"] = throughput["backlog"]["ratio_to_ceiling"]
        out["writes_per_placement"] = throughput["backlog"]["writes_per_placement"]
    for turns in results.get("turns", []):
        if turns["usage_interval_s"] == results.get("turns_default_interval_s"):
            out["writes_per_turn_spec_patches"] = turns["writes_per_turn"]
            out["writes_per_turn_spec_patches_with_status"] = turns["writes_per_turn_with_status"]
    for turns in results.get("turns_stream", []):
        if turns["checkpoint_interval_s"] == CHECKPOINT_INTERVAL_S:
            out["writes_per_turn"] = turns["writes_per_turn"]
    memory = results.get("memory")
    if memory:
        out["operator_rss_mib_40s_later"] = memory["operator_rss_mib_40s_later"]
        out["operator_rss_mib_after_restart"] = memory["operator_rss_mib_after_restart"]
    for run in results.get("replicas", []):
        entry = {"placements_per_s": run["placements_per_s"], "writes_per_placement": run["writes_per_placement"]}
        if ceiling:
            entry["throughput_ratio"] = round(run["placements_per_s"] / ceiling, 3)
        out[f"replicas_{run['replicas']}"] = entry
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", default=os.environ.get("CONSERVE_KUBECONFIG"))
    parser.add_argument("--out", "--json", type=Path, default=Path("results/operator_bench.json"))
    parser.add_argument("--threads", type=int, default=16, help="client threads (creations and the ceiling)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each latency run")
    parser.add_argument("--throughput-count", type=int, default=1500)
    parser.add_argument("--memory-conversations", type=int, default=10_000)
    parser.add_argument("--memory-decoders", type=int, default=1_000)
    parser.add_argument("--replicas", default="1,2,4", help="operator replica counts of the sharded scenario")
    parser.add_argument("--replica-count", type=int, default=1200, help="conversations of each replica run")
    parser.add_argument(
        "--skip", action="append", default=[], choices=["latency", "throughput", "memory", "replicas", "turns"]
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="conserve-bench-"))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "work_dir": str(work)}
    with cluster(args.kubeconfig, work) as kubeconfig:
        # Room for 1,000 decoder pods: 12 extra fake H200 nodes of 250 pods each.
        bench_nodes = nodes.make_gpu_nodes("bench-h200", 12, "NVIDIA-H200", 8, 143771, pods="250")
        node_names = nodes.apply_gpu_nodes(kubeconfig, bench_nodes)
        nodes.wait_nodes_ready(kubeconfig, node_names)
        api_client = nodes.new_api_client(kubeconfig, pool_size=args.threads + 4)
        install_crds(api_client)
        if "latency" not in args.skip:
            results["latency"] = [
                scenario_latency(api_client, kubeconfig, rate, int(rate * args.seconds), node_names, work, args.threads)
                for rate in (50.0, 200.0)
            ]
            print(json.dumps(results["latency"], indent=1), flush=True)
        if "throughput" not in args.skip:
            results["throughput"] = scenario_throughput(
                api_client, kubeconfig, args.throughput_count, node_names, work, args.threads
            )
            print(json.dumps(results["throughput"], indent=1), flush=True)
        if "replicas" not in args.skip:
            results["replicas"] = [
                scenario_replicas(api_client, kubeconfig, int(r), args.replica_count, node_names, work, args.threads)
                for r in args.replicas.split(",")
            ]
            print(json.dumps(results["replicas"], indent=1), flush=True)
        if "memory" not in args.skip:
            results["memory"] = scenario_memory(
                api_client, kubeconfig, args.memory_conversations, args.memory_decoders, node_names, work, args.threads
            )
            print(json.dumps(results["memory"], indent=1), flush=True)
    if "turns" not in args.skip:
        # Without --usage-endpoint: spec.usage patches (the router's default interval, and 0.5 s).
        results["turns"] = [usage_writes_per_turn(i) for i in sorted({0.5, RouterConfig().usage_interval_s})]
        results["turns_default_interval_s"] = RouterConfig().usage_interval_s
        # Streamed to the operator (issue 29): its default checkpoint interval, and a shorter one.
        results["turns_stream"] = [stream_writes_per_turn(i) for i in sorted({60.0, CHECKPOINT_INTERVAL_S})]
    results["summary"] = summary(results)
    print(json.dumps(results["summary"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
