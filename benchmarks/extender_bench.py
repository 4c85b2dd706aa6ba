"""Benchmark of the ConServe scheduler extender (not a test).

    .venv/bin/python benchmarks/extender_bench.py latency    [--sizes 100,1000,5000] [--calls 300]
    .venv/bin/python benchmarks/extender_bench.py throughput [--nodes 1000] [--pods 500] [--rounds 2]

latency: one filter call and one prioritize call per pod, as kube-scheduler makes them in nodeCacheCapable mode
(NodeNames only; prioritize gets the nodes that passed the filter), over HTTP on loopback to the real aiohttp
server with a watch cache filled with the fleet and half as many bound pods. p50 and p99 per verb and of the
pair; also the in-process time (parse, decide, encode) without HTTP.

throughput: a local control plane (etcd, kube-apiserver, kube-controller-manager, two kube-schedulers, KWOK)
with `--nodes` fake GPU nodes; the same pods (role-labelled, one GPU each) scheduled by the default scheduler
(no extender) and by `conserve-scheduler` (the extender, strict policy), interleaved for `--rounds`. Reports
wall-clock pods/s (first create to last bind) and the schedulers' own per-pod scheduling-cycle time
(`scheduler_scheduling_algorithm_duration_seconds`, extender calls included), and their ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import http.client
import json
import random
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from conserve.devcluster import build
from conserve.devcluster.cluster import LocalCluster
from conserve.devcluster.nodes import GpuNodeSpec, apply_gpu_nodes, new_api_client, wait_nodes_ready
from conserve.extender.cache import ClusterCache
from conserve.extender.cli import build_extender
from conserve.extender.server import BackgroundServer, ExtenderApp
from conserve.extender.service import ExtenderService, ExtenderSettings
from conserve.extender.testing import GFD_PRODUCTS, fleet, pod
from conserve.kube import ApiError
from conserve.kube.clients import CoreV1Api
from conserve.testkit import wait_for


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(round(q / 100 * (len(ordered) - 1)), len(ordered) - 1)
    return ordered[index]


def fmt_ms(values: Sequence[float]) -> str:
    return f"p50 {percentile(values, 50) * 1e3:7.3f} ms  p99 {percentile(values, 99) * 1e3:7.3f} ms"


# --- latency ----------------------------------------------------------------------------------------------------


def latency(sizes: Sequence[int], calls: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    print(f"extender latency, nodeCacheCapable, {calls} pods per size (filter then prioritize of the fits)")
    for size in sizes:
        nodes = fleet(size)
        names = [n["metadata"]["name"] for n in nodes]
        cache = ClusterCache()
        cache.replace_nodes(nodes)
        bound = [
            pod(
                f"bound-{i}",
                rng.choice(["prefill", "decode", None]),
                gpus=rng.randint(1, 4),
                node_name=rng.choice(names),
            )
            for i in range(size // 2)
        ]
        for p in bound:
            p["status"]["phase"] = "Running"
        cache.replace_pods(bound)
        gc.collect()
        gc.freeze()  # as `conserve extender` does once its cache has synced
        app = ExtenderApp(ExtenderService(ExtenderSettings(), cache))
        pods = [pod(f"p-{i}", "prefill" if i % 2 else "decode", gpus=rng.choice([1, 1, 2, 8])) for i in range(calls)]
        bodies = [json.dumps({"Pod": p, "Nodes": None, "NodeNames": names}).encode() for p in pods]

        # in-process: parse + decide + encode, no HTTP
        # (thread CPU time as well: this machine may be shared, and CPU time is what the extender itself spends)
        inproc: list[float] = []
        inproc_cpu: list[float] = []
        for body in bodies:
            t0, c0 = time.perf_counter(), time.thread_time()
            filtered = app.answer_filter(body)
            t1, c1 = time.perf_counter(), time.thread_time()
            result = json.loads(filtered)
            body2 = json.dumps({"Pod": json.loads(body)["Pod"], "Nodes": None, "NodeNames": result["NodeNames"]})
            t2, c2 = time.perf_counter(), time.thread_time()
            app.answer_prioritize(body2.encode())
            inproc.append((t1 - t0) + (time.perf_counter() - t2))
            inproc_cpu.append((c1 - c0) + (time.thread_time() - c2))

        with BackgroundServer(app.build()) as server:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
            filt: list[float] = []
            prio: list[float] = []
            pair: list[float] = []
            for warm, body in [(True, b) for b in bodies[:20]] + [(False, b) for b in bodies]:
                t0 = time.perf_counter()
                conn.request("POST", "/filter", body, {"Content-Type": "application/json"})
                result = json.loads(conn.getresponse().read())
                t1 = time.perf_counter()
                body2 = json.dumps({"Pod": json.loads(body)["Pod"], "Nodes": None, "NodeNames": result["NodeNames"]})
                t2 = time.perf_counter()
                conn.request("POST", "/prioritize", body2.encode(), {"Content-Type": "application/json"})
                scores = json.loads(conn.getresponse().read())
                t3 = time.perf_counter()
                assert len(scores) == len(result["NodeNames"])
                if not warm:
                    filt.append(t1 - t0)
                    prio.append(t3 - t2)
                    pair.append((t1 - t0) + (t3 - t2))
            conn.close()
        print(f"  {size:5d} nodes  filter     {fmt_ms(filt)}")
        print(f"  {size:5d} nodes  prioritize {fmt_ms(prio)}")
        print(f"  {size:5d} nodes  both, HTTP {fmt_ms(pair)}")
        print(f"  {size:5d} nodes  both, in-process (no HTTP) {fmt_ms(inproc)}")
        print(f"  {size:5d} nodes  both, in-process CPU time  {fmt_ms(inproc_cpu)}")
        sys.stdout.flush()


# --- throughput -------------------------------------------------------------------------------------------------


def scheduler_metrics(url: str, context: ssl.SSLContext) -> dict[str, float]:
    """Sum and count of the scheduling-cycle histogram of one kube-scheduler."""
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("scheduler_scheduling_algorithm_duration_seconds",):
            for sample in family.samples:
                if sample.name.endswith("_sum") or sample.name.endswith("_count"):
                    key = family.name + ("_sum" if sample.name.endswith("_sum") else "_count")
                    out[key] = out.get(key, 0.0) + sample.value
    return out


def schedule_pods(
    core: Any, scheduler: str, namespace: str, pod_count: int, metrics_url: str, ctx: ssl.SSLContext
) -> tuple[float, float, float]:
    """Create `pod_count` pods for `scheduler` in a new namespace; (pods/s to the last bind, cycle s, attempts)."""
    core.create_namespace({"metadata": {"name": namespace}})
    wait_for(
        "the namespace's default ServiceAccount",
        lambda: core.read_namespaced_service_account("default", namespace),
        tolerate=(ApiError,),
    )
    before = scheduler_metrics(metrics_url, ctx)
    pods = [
        pod(f"p-{i}", "prefill" if i % 2 else "decode", namespace=namespace, scheduler_name=scheduler)
        for i in range(pod_count)
    ]
    for p in pods:
        del p["metadata"]["uid"]
        p["status"] = {}
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda body: core.create_namespaced_pod(namespace, body), pods))
    # Poll (a watch thread in this process lags behind under load): the time all are bound, to 0.25 s.
    bound = 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        listed = core.list_namespaced_pod(namespace, _preload_content=False)
        bound = sum(1 for p in json.loads(listed.data)["items"] if p["spec"].get("nodeName"))
        if bound >= pod_count:
            break
        time.sleep(0.25)
    elapsed = time.perf_counter() - start
    if bound < pod_count:
        print(f"  {scheduler}: only {bound}/{pod_count} bound after 600 s")
    after = scheduler_metrics(metrics_url, ctx)
    name = "scheduler_scheduling_algorithm_duration_seconds"
    attempts = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    cycle_s = (after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)) / max(attempts, 1)
    core.delete_namespace(namespace)
    return bound / elapsed, cycle_s, attempts


def throughput(node_count: int, pod_count: int, rounds: int) -> None:
    build.build_all()
    kinds = list(GFD_PRODUCTS)
    specs = [
        GpuNodeSpec(
            name=f"bench-{kinds[i % len(kinds)].lower()}-{i}",
            gpu_product=GFD_PRODUCTS[kinds[i % len(kinds)]][0],
            gpu_count=8,
            gpu_memory_mib=GFD_PRODUCTS[kinds[i % len(kinds)]][1],
        )
        for i in range(node_count)
    ]
    with (
        tempfile.TemporaryDirectory(prefix="conserve-bench-") as state,
        LocalCluster(Path(state), unlimited_inflight=True, die_with_parent=True) as local,
    ):
        t0 = time.perf_counter()
        names = apply_gpu_nodes(local.kubeconfig, specs, parallelism=16)
        wait_nodes_ready(local.kubeconfig, names, timeout_s=300)
        print(f"{node_count} KWOK nodes Ready in {time.perf_counter() - t0:.1f} s")
        extender = build_extender(ExtenderSettings(), kubeconfig=str(local.kubeconfig))
        server = BackgroundServer(extender.app(), host="127.0.0.1", port=local.extender_port).start()
        cache = extender.cache
        assert cache is not None
        wait_for("the extender's cache of every node", lambda: extender.ready() and cache.node_count >= node_count, 120)

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(str(local.pki_dir / "admin.crt"), str(local.pki_dir / "admin.key"))
        metrics_url = {
            "default-scheduler": f"https://127.0.0.1:{local.ports.scheduler}/metrics",
            "conserve-scheduler": f"https://127.0.0.1:{local.ports.conserve_scheduler}/metrics",
        }
        api_client = new_api_client(local.kubeconfig, pool_size=32)
        core = CoreV1Api(api_client)
        results: dict[str, list[tuple[float, float]]] = {"default-scheduler": [], "conserve-scheduler": []}
        for round_ in range(rounds):
            for scheduler_name in ("default-scheduler", "conserve-scheduler"):
                namespace = f"bench-{scheduler_name.split('-')[0]}-{round_}"
                rate, cycle_s, attempts = schedule_pods(
                    core, scheduler_name, namespace, pod_count, metrics_url[scheduler_name], ctx
                )
                results[scheduler_name].append((rate, cycle_s))
                print(
                    f"  round {round_} {scheduler_name:18s}: {rate:6.1f} pods/s (first create to last bind); "
                    f"scheduling cycle {cycle_s * 1e3:.2f} ms/pod over {attempts:.0f} attempts"
                )
                sys.stdout.flush()
        api_client.close()
        server.stop()
        if extender.watcher is not None:
            extender.watcher.stop()

    def mean(scheduler: str, index: int) -> float:
        return statistics.mean(r[index] for r in results[scheduler])

    wall = mean("conserve-scheduler", 0) / mean("default-scheduler", 0)
    cycle = mean("default-scheduler", 1) / mean("conserve-scheduler", 1)
    print(
        f"throughput on {node_count} KWOK nodes, {pod_count} pods x {rounds} rounds: "
        f"default {mean('default-scheduler', 0):.1f} pods/s, with extender {mean('conserve-scheduler', 0):.1f} pods/s "
        f"-> ratio {wall:.2f}; scheduling cycle default {mean('default-scheduler', 1) * 1e3:.2f} ms, with extender "
        f"{mean('conserve-scheduler', 1) * 1e3:.2f} ms -> capacity ratio {cycle:.2f} "
        f"({1 / mean('default-scheduler', 1):.0f} vs {1 / mean('conserve-scheduler', 1):.0f} pods/s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--sizes", default="100,1000,5000")
    lat.add_argument("--calls", type=int, default=300)
    thr = sub.add_parser("throughput")
    thr.add_argument("--nodes", type=int, default=1000)
    thr.add_argument("--pods", type=int, default=500)
    thr.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.what == "latency":
        latency([int(s) for s in args.sizes.split(",")], args.calls)
    else:
        throughput(args.nodes, args.pods, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
