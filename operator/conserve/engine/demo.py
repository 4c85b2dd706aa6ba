"""`conserve demo --engine vllm`: the main job with real vLLM CPU servers and the tiny local model.

The local control plane (unless ``--kubeconfig``), the CRDs, the operator, `conserve engine pods` (a real vLLM
server per serving pod: prefill a NIXL producer, decode a consumer) and the router; a DecoderPool with one
prefill and one decode Deployment (the smallest disaggregated fleet: each vLLM instance needs a core of its own).
Then a few multi-turn chat conversations, streamed, in each routing mode, and a report per turn: which decoder and
prefill server served it, the client's TTFT, and where the turn's prompt KV came from on each engine (vLLM's own
``vllm:prompt_tokens_by_source_total``: computed, prefix-cache hit, or pulled over NIXL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conserve.devcluster import commands
from conserve.engine.install import missing_reason
from conserve.engine.metrics import TokenSources, healthy, scrape, token_sources
from conserve.engine.model import TINY_MODEL_NAME
from conserve.engine.server import kill_leftovers

PRODUCTS = {"prefill": "NVIDIA-H100-80GB-HBM3", "decode": "NVIDIA-H200"}
# The tiny model's shape (tinymodel.py), for the operator's KV accounting.
TINY_SHAPE = {"parameters": 800000, "layers": 2, "hiddenSize": 128, "attentionHeads": 4, "kvHeads": 2, "headDim": 32}


def manifests(namespace: str, model: str = TINY_MODEL_NAME) -> list[dict[str, Any]]:
    def deployment(role: str) -> dict[str, Any]:
        return commands.serving_deployment(namespace, role, model=model, image="vllm-cpu", gpu_product=PRODUCTS[role])

    model_spec = {"name": model, **({"shape": TINY_SHAPE} if model == TINY_MODEL_NAME else {})}
    return [commands.serving_pool(namespace, model_spec), deployment("prefill"), deployment("decode")]


@dataclass(frozen=True, slots=True)
class TurnRow:
    mode: str
    conversation: str
    turn: int
    decoder: str
    prefill: str
    prompt_tokens: int
    ttft_s: float
    decoder_kv: TokenSources
    prefill_kv: TokenSources


def stream_turn(
    router: str, conv: str | None, mode: str, messages: list[dict[str, str]]
) -> tuple[str, dict[str, str], float, int]:
    """One streamed chat turn: (text, response headers, TTFT seconds, prompt tokens). Without ``conv`` the router
    serves it as a one-turn request (prefilled, its KV moved to a decoder; no Conversation object)."""
    body = {
        "model": TINY_MODEL_NAME, "messages": messages, "max_tokens": 16, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    headers = {"Content-Type": "application/json", "X-Conserve-Routing": mode}
    if conv is not None:
        headers["X-Conversation-Id"] = conv
    req = urllib.request.Request(f"{router}/v1/chat/completions", json.dumps(body).encode(), headers, method="POST")
    sent = time.monotonic()
    ttft: float | None = None
    text, prompt_tokens = "", 0
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                if ttft is None:
                    ttft = time.monotonic() - sent
                text += (choice.get("delta") or {}).get("content") or ""
            if chunk.get("usage"):
                prompt_tokens = int(chunk["usage"]["prompt_tokens"])
        response_headers = dict(resp.headers)
    return text, response_headers, ttft or time.monotonic() - sent, prompt_tokens


def prompt_text(words: int, seed: int) -> str:
    return " ".join(f"w{(seed * 7919 + i * 104729) % 100003}" for i in range(words))


def warm_up(router: str) -> float:
    """One untimed one-turn request through the prefill server and the decoder: the first KV transfer between a
    pair of servers includes NIXL's handshake (1-20 s on a loaded 2-core host), which would otherwise be charged to
    whichever routing mode runs first. Returns its TTFT in seconds."""
    return stream_turn(router, None, "per-turn", [{"role": "user", "content": prompt_text(800, seed=9973)}])[2]


def run_conversations(
    router: str, backends: dict[str, Any], modes: list[str], conversations: int, turns: int
) -> list[TurnRow]:
    prefill_ep = backends["prefills"][0]["endpoint"]
    decoder_ep = backends["decoders"][0]["endpoint"]
    rows = []
    for mode in modes:
        for c in range(conversations):
            conv = f"{mode}-{c}"
            messages = [{"role": "user", "content": prompt_text(800, seed=100 * modes.index(mode) + c)}]
            for turn in range(1, turns + 1):
                dec0, pre0 = token_sources(scrape(decoder_ep)), token_sources(scrape(prefill_ep))
                text, headers, ttft, prompt = stream_turn(router, conv, mode, messages)
                dec, pre = token_sources(scrape(decoder_ep)) - dec0, token_sources(scrape(prefill_ep)) - pre0
                rows.append(
                    TurnRow(
                        mode, conv, turn, headers.get("X-Conserve-Decoder", "?"),
                        headers.get("X-Conserve-Prefill", "-") or "-", prompt, ttft, dec, pre,
                    )
                )  # fmt: skip
                messages += [{"role": "assistant", "content": text}, {"role": "user", "content": prompt_text(60, turn)}]
    return rows


def report(rows: list[TurnRow]) -> str:
    lines = [
        f"{'mode':<13}{'conversation':<16}{'turn':>4}  {'decoder':<24}{'prefill':<24}{'prompt':>7}{'TTFT ms':>9}"
        f"  decoder KV: {'pulled':>7}{'cached':>8}{'computed':>9}  prefill computed",
    ]
    for r in rows:
        lines.append(
            f"{r.mode:<13}{r.conversation:<16}{r.turn:>4}  {r.decoder:<24}{r.prefill:<24}{r.prompt_tokens:>7}"
            f"{r.ttft_s * 1000:>9.0f}              {r.decoder_kv.external_kv_transfer:>7.0f}"
            f"{r.decoder_kv.local_cache_hit:>8.0f}{r.decoder_kv.local_compute:>9.0f}"
            f"  {r.prefill_kv.local_compute:>8.0f}"
        )
    for mode in sorted({r.mode for r in rows}):
        first = [r.ttft_s for r in rows if r.mode == mode and r.turn == 1]
        later = [r.ttft_s for r in rows if r.mode == mode and r.turn > 1]
        if first and later:
            lines.append(
                f"TTFT {mode}: turn 1 (remote prefill + NIXL transfer) median {statistics.median(first) * 1000:.0f} ms "
                f"(n={len(first)}); later turns median {statistics.median(later) * 1000:.0f} ms (n={len(later)})"
            )
    return "\n".join(lines)


def _wait(what: str, probe: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(1.0)
    raise SystemExit(f"timed out waiting for {what} (see the logs folder)")


def _backends(router: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{router}/conserve/backends", timeout=2) as resp:
            data: dict[str, Any] = json.loads(resp.read())
    except OSError:
        return None
    servers = [*data.get("prefills", []), *data.get("decoders", [])]
    # The operator lists a pod (at its pod IP) before the runner's server is up and annotated.
    ready = data.get("prefills") and data.get("decoders") and all(healthy(s["endpoint"]) for s in servers)
    return data if ready else None


@dataclass(frozen=True, slots=True)
class Stack:
    router: str  # base URL
    backends: dict[str, Any]
    kubeconfig: Path
    model: str
    ready_s: float  # pods created -> both servers ready behind the router


@contextlib.contextmanager
def stack(
    *, engine: str, state_dir: Path, kubeconfig: Path | None, namespace: str, router_port: int, logs: Path, keep: bool
) -> Iterator[Stack]:
    """Cluster (unless ``kubeconfig``), operator, one prefill and one decode pod behind real vLLM (``engine``
    "vllm") or gpu-sim ("gpu-sim", model llama-3-8b), and the router; everything stopped on exit."""
    logs.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the servers, their process groups and the cluster are stopped below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started_cluster = kubeconfig is None
    if started_cluster:
        print("cluster: conserve dev up ...", flush=True)
        subprocess.run(commands.conserve_command("dev", "up", f"--state-dir={state_dir}", "--free-ports"), check=True)
    kube: Path = state_dir.resolve() / "kubeconfig" if kubeconfig is None else kubeconfig
    env = {**os.environ, "KUBECONFIG": str(kube)}
    engines = (logs / "engines").resolve()
    procs: list[subprocess.Popen[bytes]] = []
    model = TINY_MODEL_NAME if engine == "vllm" else "llama-3-8b"

    def start(name: str, *cmd: str) -> None:
        with (logs / f"{name}.log").open("wb") as out:
            procs.append(
                subprocess.Popen(
                    commands.conserve_command(*cmd),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )

    try:
        commands.apply_crds(kube)
        commands.create_namespace(kube, namespace)
        kc = f"--kubeconfig={kube}"
        start("operator", "operator", f"--namespace={namespace}", "--no-leader-elect", "--metrics-port=0")
        if engine == "vllm":
            start("engines", "engine", "pods", kc, f"--namespace={namespace}", f"--work-dir={engines}")
        else:
            start("gpusim", "gpu-sim", "pods", kc, f"--namespace={namespace}", "--stream-interval=1")
        start("router", "router", kc, f"--namespace={namespace}", "--pool=chat", f"--port={router_port}")
        t0 = time.monotonic()
        commands.apply_manifests(kube, manifests(namespace, model))
        router = f"http://127.0.0.1:{router_port}"
        backends = _wait(f"a {engine} prefill server and decoder behind the router", lambda: _backends(router), 900)
        yield Stack(router, backends, kube, model, time.monotonic() - t0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        kill_leftovers(engines)
        if started_cluster and not keep:
            subprocess.run(commands.conserve_command("dev", "down", f"--state-dir={state_dir}"), check=False)


def run(args: argparse.Namespace) -> int:
    """The body of `conserve demo --engine vllm` (its arguments are the demo's)."""
    reason = missing_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    with stack(
        engine="vllm",
        state_dir=args.state_dir,
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        router_port=args.router_port,
        logs=args.logs,
        keep=args.keep,
    ) as s:
        print(f"engines: prefill and decode vLLM servers ready in {s.ready_s:.0f} s", flush=True)
        print(commands.kubectl(s.kubeconfig, "get", "pods", "-n", args.namespace, "-o", "wide"), flush=True)
        warm_ms = warm_up(s.router) * 1000
        print(f"engines: the first KV transfer (NIXL handshake), not counted below: {warm_ms:.0f} ms", flush=True)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        rows = run_conversations(s.router, s.backends, modes, args.vllm_conversations, args.vllm_turns)
        print(report(rows), flush=True)
        convs = json.loads(commands.kubectl(s.kubeconfig, "get", "conversations", "-n", args.namespace, "-o", "json"))
        for item in convs.get("items", []):
            status = item.get("status") or {}
            print(
                f"Conversation {item['metadata']['name']}: decoder {(status.get('decoder') or {}).get('pod')}, "
                f"KV transfers {status.get('kvTransfers')}, turns served {status.get('turnsServed')}"
            )
    return 0
