"""`conserve demo`: the whole system on one machine, a Mooncake slice replayed through it, a short report.

1. The local control plane (`conserve dev up`: etcd, kube-apiserver, controller-manager, kube-scheduler with the
   `conserve-scheduler` profile, KWOK fake GPU nodes), unless `--kubeconfig` names a cluster.
2. CRDs applied; the operator (with its energy loop reading the fake DCGM exporter), the scheduler extender, the
   gpu-sim pod runner, `conserve fake-dcgm --from-cluster` (each pod's GPU drawing the power its gpu-sim server
   models) and the router started.
3. A DecoderPool with a prefill and a decode Deployment that the conserve-scheduler places (prefill on the
   compute tier, decode on the bandwidth tier); each pod answers through a gpu-sim server.
4. The slice replayed in both routing modes one after the other (`conserve load`; the servers drain between
   them), the offline simulator on the same slice and fleet beside them; the report: placements (conversations
   per decoder, KV transfers), TTFET p50/p95/p99 per mode, where each turn's prompt was prefilled (per mode, first
   and later turns: on the pool or on the decoder, from the router's `X-Conserve-Prefill-Site`; the simulator's
   beside), the router's placement wait, J per output token from the fake DCGM exporter through the operator's
   attribution (DecoderPool and Conversation status) beside gpu-sim's own counters.
5. Everything it started is stopped; the cluster is torn down unless `--keep`.

Default slice and fleet, and why. TTFET is a conversation's first visible token, so on Mooncake (every turn
visible) it is the first turn's TTFT: the per-turn mode loses on it only through load, when its follow-up turns
re-prefill their whole context on the prefill servers (and move the whole KV) and so queue the first turns of
other conversations; the conversation mode pays instead the control plane's placement on the first turn's path
(overlapped with the prefill). So the comparison needs (a) a fleet sized for the trace's load: 2 prefill (H100)
+ 4 decode (H200) pods for llama-3-8b carry Mooncake's ~2.3 new conversations/s with first-turn TTFT p50 about
1 s in the offline simulator, where 1 prefill pod saturates (p50 > 30 s in both modes); and (b) a window long
enough to hold follow-ups (Mooncake's turns are about 2 minutes apart, so a 150 s window holds ~20 follow-ups
per 350 conversations). The offline simulator on this fleet over twelve 300 s windows of the trace gives the
conversation policy a p95 TTFET lead from 0% to 46% (median about 5%): the lead follows the load, and quiet
windows show none. The default window is the trace's first 180 s (start 0), its busiest (479 conversations, 77
follow-ups; offline p95 11.5 s vs 19.9 s); it is chosen because it is where the follow-ups' re-prefill load is
large enough to show, and the report prints the offline figures of the same slice beside the live ones, so
`--start-s 600` (a quiet window: offline 7.4 s vs 7.7 s) reproduces the small-gain case.
Speed-up 1 by default: the control plane's latency is real wall time while gpu-sim's is scaled by 1/speedup,
so at speed-up s every real second of placement wait counts as s modelled seconds against the conversation
mode (and the fake DCGM exporter's counters follow gpu-sim's modelled joules, which at speed-up s arrive s times
as fast as a board draws them: the operator clamps deltas above 1.5 x TDP); `--speedup` > 1 is faster but biased so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from conserve.cliargs import add_seconds_option
from conserve.devcluster import commands, prometheus
from conserve.devcluster.cluster import LocalCluster
from conserve.engine import demo as engine_demo
from conserve.load import demo_prometheus
from conserve.load.cli import energy_j, offline, run_modes
from conserve.load.report import format_table, histogram_quantile, slice_workload
from conserve.sim.workload import load_workload


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("demo", help="local cluster + operator + extender + router + gpu-sim; replay a slice")
    p.add_argument("--state-dir", type=Path, default=Path(".devcluster"), help="local cluster state directory")
    p.add_argument("--kubeconfig", type=Path, default=None, help="use this cluster instead of starting one")
    p.add_argument("--namespace", default="conserve-demo")
    p.add_argument("--prefill", type=int, default=2, help="prefill pods")
    p.add_argument("--decoders", type=int, default=4, help="decode pods")
    p.add_argument("--workload", default="mooncake", help="mooncake, azure, agentic, or a trace file")
    p.add_argument(
        "--trace-dir", type=Path, default=None, help="folder holding mooncake/ and azure/ (default: the shipped traces)"
    )
    add_seconds_option(p, "--start-s", 0.0, "slice start, trace seconds; see the module doc")
    add_seconds_option(p, "--duration-s", 180.0, "slice length, trace seconds")
    p.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="gpu-sim runs with --time-scale 1/speedup (> 1 stretches the control plane's real latency)",
    )
    add_seconds_option(p, "--energy-interval", 2.0, "the operator's energy loop period")
    p.add_argument("--modes", default="conversation,per-turn")
    p.add_argument("--router-port", type=int, default=8080)
    p.add_argument("--dcgm-port", type=int, default=0, help="fake DCGM exporter port (0: a free one)")
    p.add_argument("--keep", action="store_true", help="leave the cluster and the demo processes' pods up")
    p.add_argument(
        "--no-prometheus",
        dest="prometheus",
        action="store_false",
        help="run no Prometheus (by default one scrapes the demo's components; the PNG plots are drawn from it)",
    )
    p.add_argument("--prometheus-port", type=int, default=0, help="port of the demo's Prometheus (0: a free one)")
    p.add_argument(
        "--keep-prometheus", action="store_true", help="leave the demo's Prometheus running afterwards (its address)"
    )
    p.add_argument("--logs", type=Path, default=Path(".demo-logs"))
    p.add_argument(
        "--engine",
        choices=["gpu-sim", "vllm"],
        default="gpu-sim",
        help="vllm: real vLLM CPU servers with the tiny local model (needs `make engine`), a few conversations",
    )
    p.add_argument("--vllm-conversations", type=int, default=2, help="--engine vllm: conversations per mode")
    p.add_argument("--vllm-turns", type=int, default=3, help="--engine vllm: turns per conversation")
    p.set_defaults(func=_run)


def _manifests(namespace: str, prefill: int, decoders: int) -> list[dict[str, Any]]:
    def deployment(role: str, replicas: int) -> dict[str, Any]:
        return commands.serving_deployment(
            namespace,
            role,
            model="llama-3-8b",
            image="vllm/vllm-openai:latest",
            replicas=replicas,
            scheduler_name="conserve-scheduler",
        )

    return [
        commands.serving_pool(namespace, {"name": "llama-3-8b"}),
        deployment("prefill", prefill),
        deployment("decode", decoders),
    ]


def _run(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        return engine_demo.run(args)
    args.logs.mkdir(parents=True, exist_ok=True)
    started_cluster = False
    if args.kubeconfig is None:
        print("cluster: conserve dev up ...", flush=True)
        subprocess.run(
            commands.conserve_command("dev", "up", f"--state-dir={args.state_dir}", "--free-ports"), check=True
        )
        started_cluster = True
        kubeconfig = args.state_dir.resolve() / "kubeconfig"
    else:
        kubeconfig = args.kubeconfig
    extender_port = LocalCluster.attach(args.state_dir).extender_port if args.kubeconfig is None else 8888
    procs: list[subprocess.Popen[bytes]] = []
    prom: prometheus.Prometheus | None = None
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def start(name: str, *cmd: str) -> None:
        with (args.logs / f"{name}.log").open("wb") as out:
            procs.append(
                subprocess.Popen(commands.conserve_command(*cmd), stdout=out, stderr=subprocess.STDOUT, env=env)
            )

    try:
        commands.apply_crds(kubeconfig)
        commands.create_namespace(kubeconfig, args.namespace)
        kc = f"--kubeconfig={kubeconfig}"
        dcgm_port, metrics_port = args.dcgm_port or _free_port(), demo_prometheus.operator_metrics_port(args)
        start("extender", "extender", "--host=127.0.0.1", f"--port={extender_port}", kc)
        start(
            "fake-dcgm",
            "fake-dcgm",
            "--from-cluster",
            kc,
            f"--namespace={args.namespace}",
            "--host=127.0.0.1",
            f"--port={dcgm_port}",
            "--refresh-seconds=2",
            "--tick-seconds=0.5",
        )
        start(
            "operator",
            "operator",
            f"--namespace={args.namespace}",
            "--no-leader-elect",
            f"--metrics-port={metrics_port}",
            "--energy-source=dcgm",
            f"--dcgm-url=http://127.0.0.1:{dcgm_port}/metrics",
            f"--energy-interval-seconds={args.energy_interval}",
        )
        start(
            "gpusim",
            "gpu-sim",
            "pods",
            kc,
            f"--namespace={args.namespace}",
            f"--time-scale={1 / args.speedup}",
            "--stream-interval=8",
        )
        start("router", "router", kc, f"--namespace={args.namespace}", "--pool=chat", f"--port={args.router_port}")
        ports = {"operator": metrics_port, "router": args.router_port, "extender": extender_port}
        prom = demo_prometheus.start(args, kubeconfig, ports)
        started_s = time.time()
        time.sleep(2.0)  # the extender's watch cache before the pods are scheduled
        commands.apply_manifests(kubeconfig, _manifests(args.namespace, args.prefill, args.decoders))
        router = f"http://127.0.0.1:{args.router_port}"
        _wait_backends(router, args.prefill, args.decoders)
        print(commands.kubectl(kubeconfig, "get", "pods", "-n", args.namespace, "-o", "wide"), flush=True)
        code = _replay(args, router, kubeconfig)
        _report_placements(kubeconfig, args.namespace)
        demo_prometheus.save_plots(prom, args.namespace, started_s, args.logs)
        return code
    finally:
        demo_prometheus.finish(prom, args.keep_prometheus)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if started_cluster and not args.keep:
            subprocess.run(commands.conserve_command("dev", "down", f"--state-dir={args.state_dir}"), check=False)
        elif started_cluster:
            print(f"cluster left up: export KUBECONFIG={kubeconfig}; `conserve dev down --state-dir {args.state_dir}`")


def _wait_backends(router: str, prefill: int, decoders: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{router}/conserve/backends", timeout=2) as resp:
                data = json.loads(resp.read())
            if len(data["prefills"]) >= prefill and len(data["decoders"]) >= decoders:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the pool's servers did not become ready behind the router (see .demo-logs/)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pool_energy_j(kubeconfig: Path, namespace: str, pool: str = "chat") -> float | None:
    """The operator's attributed decoder energy so far (DecoderPool status, from the fake DCGM exporter)."""
    try:
        status = json.loads(commands.kubectl(kubeconfig, "get", "decoderpool", pool, "-n", namespace, "-o", "json"))[
            "status"
        ]
    except (subprocess.CalledProcessError, KeyError, ValueError):
        return None
    values = [d.get("energyJoules") for d in status.get("decoders") or []]
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


def _conversation_energy(kubeconfig: Path, namespace: str) -> tuple[float, int, int]:
    """(sum of Conversation status energyJoules, their output tokens, conversations with energy). Output tokens
    are the data plane's `spec.usage.outputTokens`, the denominator of the operator's energyPerTokenJoules."""
    data = json.loads(commands.kubectl(kubeconfig, "get", "conversations", "-n", namespace, "-o", "json"))
    joules, tokens, count = 0.0, 0, 0
    for item in data.get("items", []):
        status = item.get("status") or {}
        if status.get("energyJoules") is not None:
            joules += float(status["energyJoules"])
            usage = (item.get("spec") or {}).get("usage") or {}
            tokens += int(usage.get("outputTokens") or status.get("outputTokens") or 0)
            count += 1
    return joules, tokens, count


async def _gpusim_energy(router: str) -> tuple[float | None, float | None]:
    """gpu-sim's modelled energy so far: (every server, decoders only)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        return await energy_j(http, router), await energy_j(http, router, "decode")


def _placement_wait(router: str) -> dict[str, tuple[float | None, float | None, float]]:
    """Per part of conserve_router_placement_wait_seconds: (p50, p95, count), from the router's histogram."""
    with urllib.request.urlopen(f"{router}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if not line.startswith("conserve_router_placement_wait_seconds_bucket{"):
            continue
        head, _, value = line.rpartition(" ")
        labels = dict(kv.split("=", 1) for kv in head[head.index("{") + 1 : -1].split(","))
        part, le = labels["part"].strip('"'), labels["le"].strip('"')
        buckets.setdefault(part, []).append((float("inf") if le == "+Inf" else float(le), float(value)))
    out = {}
    for part, rows in buckets.items():
        rows.sort()
        out[part] = (histogram_quantile(rows, 50), histogram_quantile(rows, 95), rows[-1][1])
    return out


def _replay(args: argparse.Namespace, router: str, kubeconfig: Path) -> int:
    full = load_workload(args.workload, duration_s=args.start_s + args.duration_s, trace_dir=args.trace_dir)
    workload = slice_workload(full, args.start_s, args.duration_s)
    print(
        f"replaying {workload.name}: {len(workload.conversations)} conversations, {workload.turns} turns, "
        f"speed-up {args.speedup:g}",
        flush=True,
    )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    summaries = []
    dcgm: dict[str, float | None] = {}
    decode_sim: dict[str, float | None] = {}
    settle_s = args.energy_interval + 2.0  # one energy cycle and a pool status write after the servers drain
    # The first mode needs a baseline reading: wait (bounded) for the energy loop's first write to the pool.
    deadline = time.monotonic() + 6 * settle_s
    while _pool_energy_j(kubeconfig, args.namespace) is None and time.monotonic() < deadline:
        time.sleep(1.0)
    for mode in modes:
        pool0 = _pool_energy_j(kubeconfig, args.namespace)
        _, dec0 = asyncio.run(_gpusim_energy(router))
        summaries += asyncio.run(run_modes(workload, router, [mode], args.speedup, None))
        time.sleep(settle_s)
        pool1 = _pool_energy_j(kubeconfig, args.namespace)
        _, dec1 = asyncio.run(_gpusim_energy(router))
        dcgm[mode] = None if pool0 is None or pool1 is None else pool1 - pool0
        decode_sim[mode] = None if dec0 is None or dec1 is None else dec1 - dec0
    summaries += asyncio.run(offline(workload, router))
    print(format_table(summaries))
    live = {s.label: s for s in summaries}
    conv, per_turn = live.get("conversation"), live.get("per-turn")

    def gain(a: float | None, b: float | None) -> str:
        return f"{1 - a / b:+.1%}" if a and b else "-"

    for label, p in (("live", ("conversation", "per-turn")), ("offline", ("sim:conserve", "sim:least-loaded"))):
        a, b = live.get(p[0]), live.get(p[1])
        if a and b:
            print(
                f"p95 TTFET {label}: {p[0]} {a.ttfet_p95_s or 0:.2f} s vs {p[1]} {b.ttfet_p95_s or 0:.2f} s "
                f"({gain(a.ttfet_p95_s, b.ttfet_p95_s)} lower; p50 {a.ttfet_p50_s or 0:.2f} vs "
                f"{b.ttfet_p50_s or 0:.2f} s, p99 {a.ttfet_p99_s or 0:.2f} vs {b.ttfet_p99_s or 0:.2f} s)"
            )
    waits = _placement_wait(router)
    if waits:
        print(
            "placement wait (router, real s): "
            + "; ".join(
                f"{part} p50 {p50 or 0:.3f} p95 {p95 or 0:.3f} (n={n:.0f})"
                for part, (p50, p95, n) in sorted(waits.items())
            )
        )
    for s in (conv, per_turn):
        if s is None:
            continue
        tokens = max(s.output_tokens, 1)
        joules = dcgm.get(s.label)
        sim_dec = decode_sim.get(s.label)
        print(
            f"J per output token, {s.label}: decoders via fake DCGM -> operator "
            f"{'-' if joules is None else f'{joules / tokens:.3f}'} "
            f"(gpu-sim decoders {'-' if sim_dec is None else f'{sim_dec / tokens:.3f}'}); "
            f"all servers, gpu-sim {s.energy_per_token_j or 0:.3f}"
        )
    conv_j, conv_tokens, conv_n = _conversation_energy(kubeconfig, args.namespace)
    if conv_n:
        print(
            f"Conversation status energy (operator attribution, prefill + decode, without unattributed idle): "
            f"{conv_j:.0f} J over {conv_n} conversations, {conv_j / max(conv_tokens, 1):.3f} J per output token"
        )
    return 0 if all(s.failed_turns == 0 for s in summaries) else 1


def _report_placements(kubeconfig: Path, namespace: str) -> None:
    data = json.loads(commands.kubectl(kubeconfig, "get", "conversations", "-n", namespace, "-o", "json"))
    per_decoder: Counter[str] = Counter()
    placements = pool = decoder_side = 0
    for item in data.get("items", []):
        status = item.get("status") or {}
        usage = (item.get("spec") or {}).get("usage") or {}  # the router's report (status may lag a completion)
        decoder = (status.get("decoder") or {}).get("pod", "(none)")
        per_decoder[decoder] += 1
        placements += int(status.get("placementGeneration") or 0)
        turns, on_pool = int(usage.get("turns") or 0), int(usage.get("poolPrefills") or 0)
        pool += on_pool  # each moved its KV from a prefill server
        decoder_side += max(turns - on_pool, 0)
    print(
        f"placements: {len(data.get('items', []))} conversations ({placements} placements); turns prefilled on the "
        f"pool (a KV transfer each) {pool}, on the decoder {decoder_side} (spec.usage); per decoder: "
        + ", ".join(f"{d}={n}" for d, n in sorted(per_decoder.items()))
    )
