"""A real benchmark client at the router: kubernetes-sigs inference-perf, multi-turn conversation replay.

For each engine asked for (``gpu-sim``, ``vllm``), the stack of ``conserve demo --engine vllm`` is started (local
cluster, operator, one prefill and one decode pod behind real vLLM CPU servers or gpu-sim, the router) and
inference-perf replays synthetic multi-turn conversations through the router's completions API, streamed, with
each conversation's id in ``X-Conversation-Id`` (its ``session_id_header_key``), so the router pins every
conversation's turns to one decoder. Printed per engine: inference-perf's own TTFT and ITL (p50, p90) beside the
router's TTFT and time between tokens over the same run (its Prometheus histograms, before/after deltas).

inference-perf needs Python >= 3.12: it goes into its own virtual environment (``--client-venv``, default
``~/.cache/conserve/bench/inference-perf-<version>``) made with ``python3.12`` (pyenv's shim works), without
torch. Its prompts are tokenized with the tiny local model's tokenizer (``conserve engine model``): nothing is
downloaded. Run from the repository root after ``make controlplane engine``:

    .venv/bin/python benchmarks/inference_perf_bench.py --engines gpu-sim,vllm --conversations 8 --turns 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from conserve.devcluster.build import cache_dir
from conserve.engine.demo import stack
from conserve.engine.model import ensure_model
from conserve.exposition import sample_sum

INFERENCE_PERF_VERSION = "0.7.0"
ROUTER_HISTOGRAMS = {
    "ttft": "conserve_router_time_to_first_token_seconds",
    "itl": "conserve_router_time_between_tokens_seconds",
}


def client_venv(path: Path | None) -> Path:
    venv = path or cache_dir() / "bench" / f"inference-perf-{INFERENCE_PERF_VERSION}"
    exe = venv / "bin" / "inference-perf"
    if exe.exists():
        return venv
    python = shutil.which("python3.12")
    if python is None:
        raise SystemExit("inference-perf needs Python 3.12 (python3.12 on PATH, e.g. from pyenv)")
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"inference-perf=={INFERENCE_PERF_VERSION}"], check=True)
    return venv


def config(router: str, model: str, tokenizer: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    fixed = {"type": "fixed", "min": 1, "max": 100000}
    return {
        "api": {"type": "completion", "streaming": True, "session_id_header_key": "X-Conversation-Id"},
        "data": {
            "type": "conversation_replay",
            "conversation_replay": {
                "seed": 42,
                "num_conversations": args.conversations,
                "shared_system_prompt_len": args.system_tokens,
                "dynamic_system_prompt_len": {**fixed, "mean": 64},
                "turns_per_conversation": {**fixed, "mean": args.turns},
                "input_tokens_per_turn": {**fixed, "mean": args.input_tokens},
                "output_tokens_per_turn": {**fixed, "mean": args.output_tokens},
                "max_model_len": 4096,
            },
        },
        "load": {
            "type": "concurrent",
            "stages": [{"num_requests": args.conversations * args.turns, "concurrency_level": args.concurrency}],
            "num_workers": 1,
            "request_timeout": 300,
        },
        "server": {"type": "vllm", "model_name": model, "base_url": router, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer)},
        "storage": {"local_storage": {"path": str(out)}},
        "report": {"request_lifecycle": {"summary": True, "per_stage": False, "per_request": False}},
    }


def router_histograms(router: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the router's latency histograms now."""
    with urllib.request.urlopen(f"{router}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {k: (sample_sum(text, f"{n}_sum"), sample_sum(text, f"{n}_count")) for k, n in ROUTER_HISTOGRAMS.items()}


def find_summary(out: Path) -> dict[str, Any]:
    """inference-perf's summary report (the file names differ across versions: the one with 'summary')."""
    for report in sorted(out.rglob("*.json")):
        if "summary" in report.name:
            data: dict[str, Any] = json.loads(report.read_text())
            return data
    raise SystemExit(f"no inference-perf summary report under {out}")


def pick(summary: dict[str, Any], metric: str) -> dict[str, float]:
    """Seconds at p50/p90/mean of a latency metric in the summary, wherever the version nests it."""
    found: dict[str, float] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == metric and isinstance(value, dict):
                    for q, names in (("p50", ("median", "p50")), ("p90", ("p90",)), ("mean", ("mean",))):
                        for name in names:
                            if isinstance(value.get(name), int | float):
                                found.setdefault(q, float(value[name]))
                else:
                    walk(value)

    walk(summary)
    return found


def bench_one(engine: str, args: argparse.Namespace, venv: Path, tokenizer: Path) -> dict[str, Any]:
    out = (args.out / engine).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with stack(
        engine=engine,
        state_dir=args.state_dir / engine,
        kubeconfig=None,
        namespace=f"bench-{engine}",
        router_port=args.router_port,
        logs=out / "logs",
        keep=False,
    ) as s:
        cfg = out / "config.yaml"
        cfg.write_text(yaml.safe_dump(config(s.router, s.model, tokenizer, out / "reports", args)))
        before = router_histograms(s.router)
        started = time.monotonic()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with (out / "inference-perf.log").open("wb") as log:
            code = subprocess.run(
                [str(venv / "bin" / "inference-perf"), "--config_file", str(cfg)], stdout=log, stderr=log, env=env
            ).returncode
        wall_s = time.monotonic() - started
        after = router_histograms(s.router)
    if code != 0:
        raise SystemExit(f"inference-perf failed ({code}); see {out / 'inference-perf.log'}")
    summary = find_summary(out / "reports")
    router = {k: (after[k][0] - before[k][0]) / max(after[k][1] - before[k][1], 1) for k in ROUTER_HISTOGRAMS}
    return {
        "engine": engine,
        "ready_s": s.ready_s,
        "wall_s": wall_s,
        "client_ttft": pick(summary, "time_to_first_token"),
        "client_itl": pick(summary, "inter_token_latency"),
        "router_ttft_mean": router["ttft"],
        "router_itl_mean": router["itl"],
        "turns": after["ttft"][1] - before["ttft"][1],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="gpu-sim,vllm")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--system-tokens", type=int, default=512, help="shared system prompt of every conversation")
    p.add_argument("--input-tokens", type=int, default=256, help="new user tokens per turn")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--router-port", type=int, default=18080)
    p.add_argument("--state-dir", type=Path, default=Path(".bench-cluster"))
    p.add_argument("--out", type=Path, default=Path("results/inference-perf"))
    p.add_argument("--client-venv", type=Path, default=None)
    args = p.parse_args()
    venv = client_venv(args.client_venv)
    tokenizer = ensure_model()
    rows = [bench_one(e.strip(), args, venv, tokenizer) for e in args.engines.split(",") if e.strip()]

    def ms(d: dict[str, float], q: str) -> str:
        return f"{d[q] * 1000:.1f}" if q in d else "-"

    print("inference-perf (client) TTFT and ITL p50 / p90 / mean, and the router's own means over the same turns, ms")
    print(f"{'engine':<9}{'turns':>6}{'TTFT p50':>10}{'p90':>7}{'mean':>7}{'ITL p50':>9}{'p90':>7}{'mean':>7}"
          "   router TTFT / TBT mean")  # fmt: skip
    for r in rows:
        ttft, itl = r["client_ttft"], r["client_itl"]
        print(
            f"{r['engine']:<9}{r['turns']:>6.0f}{ms(ttft, 'p50'):>10}{ms(ttft, 'p90'):>7}{ms(ttft, 'mean'):>7}"
            f"{ms(itl, 'p50'):>9}{ms(itl, 'p90'):>7}{ms(itl, 'mean'):>7}"
            f"   {r['router_ttft_mean'] * 1000:.0f} / {r['router_itl_mean'] * 1000:.1f}"
            f"   (servers ready in {r['ready_s']:.0f} s, run {r['wall_s']:.0f} s)"
        )
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
