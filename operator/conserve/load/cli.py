"""`conserve load`: replay a workload slice through the router, once per routing mode, and compare.

    conserve load --router http://127.0.0.1:8080 --workload mooncake --start-s 600 --duration-s 300 \
        --speedup 5 --modes conversation,per-turn --offline

Both modes run in the same invocation against the same servers (conversation ids are unique per run and mode;
the servers drain between modes). `--offline` also runs the offline simulator (conserve.sim) on the same slice
with a fleet read from the servers the router uses (their GPUs, via gpu-sim's /conserve/stats): ConServe and the
per-turn least-loaded baseline. The GPU simulators must run with `--time-scale 1/speedup`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import asdict
from typing import Any

import aiohttp

from conserve.exposition import sample_values


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("load", help="replay a trace slice through the router and report TTFET, TTFT, J/token")
    p.add_argument("--router", default="http://127.0.0.1:8080", help="router base URL")
    p.add_argument("--workload", default="mooncake", help="mooncake, azure, agentic, or a trace file")
    p.add_argument(
        "--trace-dir", default=None, help="folder holding mooncake/ and azure/ traces (default: the shipped traces)"
    )
    p.add_argument("--start-s", type=float, default=0.0, help="slice start in trace seconds")
    p.add_argument("--duration-s", type=float, default=120.0, help="slice length in trace seconds")
    p.add_argument("--max-conversations", type=int, default=None)
    p.add_argument("--speedup", type=float, default=1.0, help="replay this many times faster than the trace")
    p.add_argument("--modes", default="conversation,per-turn", help="routing modes to run, in order")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap each turn's output")
    p.add_argument("--seed", type=int, default=0, help="agentic workload seed")
    p.add_argument("--offline", action="store_true", help="also run the offline simulator on the same slice")
    p.add_argument("--json", default=None, help="write the summaries as JSON to this file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conserve.load.report import format_table, slice_workload
    from conserve.sim.workload import load_workload

    end = args.start_s + args.duration_s
    full = load_workload(
        args.workload, seed=args.seed, duration_s=end, trace_dir=Path(args.trace_dir) if args.trace_dir else None
    )
    workload = slice_workload(full, args.start_s, args.duration_s, args.max_conversations)
    print(
        f"workload {workload.name}: {len(workload.conversations)} conversations, {workload.turns} turns; "
        f"speed-up {args.speedup:g} (about {args.duration_s / args.speedup:.0f} s per mode)"
    )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    summaries = asyncio.run(
        run_modes(workload, args.router, modes, args.speedup, args.max_output_tokens, progress=not args.no_progress)
    )
    if args.offline:
        summaries += asyncio.run(offline(workload, args.router))
    print(format_table(summaries))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    return 0 if all(s.failed_turns == 0 for s in summaries) else 1


async def run_modes(
    workload: Any,
    router: str,
    modes: list[str],
    speedup: float,
    max_output_tokens: int | None,
    *,
    progress: bool = True,
) -> list[Any]:
    from conserve.load.replay import ReplayConfig, replay
    from conserve.load.report import summarize
    from conserve.progress import progress_bar

    run_id = uuid.uuid4().hex[:6]
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for mode in modes:
            await wait_idle(http, router)
            kv0, e0 = await router_counter(http, router, mode), await energy_j(http, router)
            bar = progress_bar(workload.turns, desc=mode, unit="turn", enabled=progress)
            config = ReplayConfig(router, mode, run_id, speedup, max_output_tokens=max_output_tokens)

            def advance(bar: Any = bar) -> None:
                bar.update(1)

            outcomes = await replay(workload, config, on_turn=advance)
            bar.close()
            kv1, e1 = await router_counter(http, router, mode), await energy_j(http, router)
            kv = None if kv0 is None or kv1 is None else kv1 - kv0
            energy = None if e0 is None or e1 is None else e1 - e0
            out.append(summarize(mode, outcomes, kv_transfers=kv, energy_j=energy))
            errors = [t.error for o in outcomes for t in o.turns if not t.ok]
            if errors:
                print(f"{mode}: {len(errors)} failed turns, e.g. {errors[0]}")
    return out


def _sample(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None when there are none (or the text is not
    an exposition)."""
    try:
        values = sample_values(text, name, labels)
    except ValueError:
        return None
    return sum(values) if values else None


async def _get_text(http: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with http.get(url) as resp:
            return await resp.text() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def backends(http: aiohttp.ClientSession, router: str) -> list[dict[str, str]]:
    text = await _get_text(http, f"{router}/conserve/backends")
    if text is None:
        return []
    data = json.loads(text)
    return [{**b, "role": "prefill"} for b in data.get("prefills", [])] + [
        {**b, "role": "decode"} for b in data.get("decoders", [])
    ]


async def router_counter(http: aiohttp.ClientSession, router: str, mode: str) -> float | None:
    text = await _get_text(http, f"{router}/metrics")
    if text is None:
        return None
    return _sample(text, "conserve_router_kv_transfers_total", {"mode": mode}) or 0.0


async def energy_j(http: aiohttp.ClientSession, router: str, role: str | None = None) -> float | None:
    """Modelled energy so far of every server behind the router (gpu-sim's counter; None if not gpu-sim);
    `role` ("prefill" or "decode"): only those servers."""
    total = 0.0
    servers = await backends(http, router)
    if role is not None:
        servers = [b for b in servers if b.get("role") == role]
    for b in servers:
        text = await _get_text(http, f"http://{b['endpoint']}/metrics")
        value = _sample(text, "conserve_gpusim_energy_joules_total") if text else None
        if value is None:
            return None
        total += value
    return total if servers else None


async def wait_idle(http: aiohttp.ClientSession, router: str, timeout_s: float = 120.0) -> None:
    """Until no server runs or queues a request (the previous mode has drained)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = 0.0
        for b in await backends(http, router):
            text = await _get_text(http, f"http://{b['endpoint']}/metrics")
            if text:
                busy += (_sample(text, "vllm:num_requests_running") or 0) + (
                    _sample(text, "vllm:num_requests_waiting") or 0
                )
        if busy == 0:
            return
        await asyncio.sleep(0.5)


async def offline(workload: Any, router: str) -> list[Any]:
    """The offline simulator on the same slice, with the fleet the router's servers form."""
    from conserve.load.offline import fleet_raw, simulate_summaries

    servers = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for b in await backends(http, router):
            text = await _get_text(http, f"http://{b['endpoint']}/conserve/stats")
            if text:
                servers.append(json.loads(text))
    if not servers:
        print("offline: no gpu-sim servers behind the router to take the fleet from")
        return []
    return simulate_summaries(workload, fleet_raw(servers))
