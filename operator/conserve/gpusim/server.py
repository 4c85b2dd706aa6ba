"""The HTTP face of the GPU-server simulator: what a vLLM OpenAI-compatible server answers.

Endpoints: POST /v1/chat/completions and /v1/completions (streaming SSE and not), GET /v1/models, /health,
/metrics (vLLM 0.32's metric names and labels, plus the modelled power and energy), GET /conserve/stats (JSON).

vLLM disaggregated prefill (NixlConnector protocol): a request to a prefill server with
`kv_transfer_params: {"do_remote_decode": true}` (and max_tokens 1) is answered with `kv_transfer_params`
`{"do_remote_prefill": true, "remote_block_ids": [[...]], "remote_engine_id", "remote_request_id", "remote_host",
"remote_port", ...}` (the same fields as vLLM 0.32's NixlConnector; tests/unit/data/vllm holds a real one); a
decode server given those pulls the KV (modelled transfer time) instead of prefilling.

Every request may carry `X-Conversation-Id`: the decode server's prefix cache is keyed by it (a stand-in for
vLLM's automatic prefix caching, which hashes the token blocks). The simulator always generates exactly
`max_tokens` tokens (as with `ignore_eos`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from conserve.api.openai_wire import prompt_tokens_of
from conserve.core.gpus import GpuSpec, lookup_product
from conserve.core.llm import ModelShape, kv_capacity_tokens, lookup_model
from conserve.core.offload import host_kv_capacity_tokens
from conserve.core.perf import LINKS, Device
from conserve.core.tokens import FILLER_TOKEN
from conserve.gpusim.engine import BLOCK_TOKENS, Engine, RequestRejected, Role, SimRequest, remote_block_ids
from conserve.probes import add_health_and_metrics

CONVERSATION_HEADER = "X-Conversation-Id"
SERVER_HEADER = "X-Conserve-Server"
DEFAULT_MAX_TOKENS = 16
#: The simulator's modelled power (W) and energy counter (J; exposed with `_total`), which the fake DCGM
#: exporter (`conserve.gpusim.fakedcgm_cluster`) follows.
POWER_METRIC = "conserve_gpusim_power_watts"
ENERGY_METRIC = "conserve_gpusim_energy_joules"


@dataclass(frozen=True, slots=True)
class GpuSimConfig:
    role: Role
    gpu: str = "H200"
    gpu_count: int = 1
    model: str = "llama-3-8b"
    host: str = "127.0.0.1"
    port: int = 8000
    time_scale: float = 1.0
    memory_fraction: float = 0.9
    link: str = "rdma"
    name: str = ""  # reported in X-Conserve-Server (the pod name under the pod runner)
    stream_interval: int = 1
    max_batch: int = 256
    kv_capacity_tokens: int | None = None  # None: derived from the GPU memory and the model
    #: Host-memory KV of a decode server (None: 125 GB per GPU over the model's KV size, core.offload; 0: none).
    host_kv_capacity_tokens: int | None = None


def resolve(config: GpuSimConfig) -> tuple[GpuSpec, ModelShape]:
    gpu = lookup_product(config.gpu)
    if gpu is None:
        raise ValueError(f"unknown GPU product {config.gpu!r}")
    model = lookup_model(config.model)
    if model is None:
        raise ValueError(f"unknown model {config.model!r}")
    return gpu, model


def build_engine(config: GpuSimConfig) -> Engine:
    gpu, model = resolve(config)
    capacity = config.kv_capacity_tokens
    if capacity is None:
        capacity = kv_capacity_tokens(
            gpu_memory_bytes=gpu.memory_bytes,
            gpu_count=config.gpu_count,
            model=model,
            memory_fraction=config.memory_fraction,
        )
    host = config.host_kv_capacity_tokens
    if host is None:
        host = host_kv_capacity_tokens(model, config.gpu_count) if config.role is not Role.PREFILL else 0
    return Engine(
        role=config.role,
        device=Device(gpu, config.gpu_count),
        model=model,
        kv_capacity_tokens=capacity,
        link=LINKS[config.link],
        time_scale=config.time_scale,
        max_batch=config.max_batch,
        stream_interval=config.stream_interval,
        host_kv_capacity_tokens=host,
    )


class _EngineCollector(Collector):
    """Reads the engine at scrape time; one per server, in its own registry."""

    def __init__(self, engine: Engine, config: GpuSimConfig) -> None:
        self._engine = engine
        self._config = config

    def collect(self) -> Iterator[Metric]:
        e, s = self._engine, self._engine.stats
        # vLLM 0.32's names and label sets (engine index, served model name); counters end in _total.
        values = ["0", self._config.model]
        labels = ["engine", "model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", e.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting for admission.", e.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0 to 1.", e.kv_usage_fraction)
        yield counter("vllm:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        by_source = CounterMetricFamily(
            "vllm:prompt_tokens_by_source",
            "Prompt tokens by where their KV came from.",
            labels=[*labels, "source"],
        )
        transferred = s.external_kv_prompt_tokens_total
        computed = max(s.prompt_tokens_total - s.prefix_cache_hit_tokens_total - transferred, 0)
        by_source.add_metric([*values, "local_compute"], computed)
        by_source.add_metric([*values, "local_cache_hit"], s.prefix_cache_hit_tokens_total)
        by_source.add_metric([*values, "external_kv_transfer"], transferred)
        yield by_source
        yield counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        success = CounterMetricFamily("vllm:request_success", "Requests finished.", labels=[*labels, "finished_reason"])
        success.add_metric([*values, "length"], s.requests_finished_total)  # gpu-sim always runs to max_tokens
        yield success
        yield counter("vllm:num_preemptions", "Preemptions (gpu-sim never preempts).", 0)
        yield counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prompt_tokens_total
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.prefix_cache_hit_tokens_total
        )
        g = GaugeMetricFamily(POWER_METRIC, "Modelled board power of this server's GPUs.", labels=["gpu", "role"])
        g.add_metric([self._config.gpu, self._config.role.value], s.power_w)
        yield g
        c = CounterMetricFamily(ENERGY_METRIC, "Modelled energy drawn (modelled time).", labels=["gpu", "role"])
        c.add_metric([self._config.gpu, self._config.role.value], e.energy_j_now())
        yield c
        yield counter(
            "conserve_gpusim_kv_transfers_received",
            "KV hand-offs pulled from prefill servers.",
            s.kv_transfers_received_total,
        )
        yield gauge("conserve_gpusim_kv_capacity_tokens", "KV capacity in tokens.", e.kv_capacity_tokens)
        yield gauge("conserve_gpusim_host_kv_capacity_tokens", "Host-memory KV capacity.", e.host_kv_capacity_tokens)
        yield gauge("conserve_gpusim_host_kv_tokens", "KV tokens offloaded to host memory.", e.host_kv_tokens)
        yield counter("conserve_gpusim_kv_offloads", "KV entries offloaded to host memory.", s.kv_offloads_total)
        yield counter("conserve_gpusim_kv_reloads", "KV entries reloaded from host memory.", s.kv_reloads_total)
        yield counter("conserve_gpusim_kv_host_drops", "Host KV entries dropped for room.", s.kv_host_drops_total)


def _max_tokens(body: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_TOKENS


class GpuSimServer:
    def __init__(self, config: GpuSimConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine if engine is not None else build_engine(config)
        self.engine_id = str(uuid.uuid4())
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(self.engine, config))
        self._runner: web.AppRunner | None = None
        self.port = config.port

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        add_health_and_metrics(app, self.registry)
        app.router.add_get("/conserve/stats", self._stats)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self.engine.start()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.engine.stop()

    async def start(self) -> int:
        """Serve on config.host:config.port (0 picks a free port); returns the port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers -------------------------------------------------------------------------------------------
    async def _models(self, _request: web.Request) -> web.Response:
        data = [{"id": self.config.model, "object": "model", "owned_by": "conserve-gpusim"}]
        return web.json_response({"object": "list", "data": data})

    async def _stats(self, _request: web.Request) -> web.Response:
        e = self.engine
        return web.json_response(
            {
                "name": self.config.name,
                "role": self.config.role.value,
                "gpu": self.config.gpu,
                "running": e.num_running,
                "waiting": e.num_waiting,
                "kvCapacityTokens": e.kv_capacity_tokens,
                "kvUsedTokens": e.used_kv_tokens,
                "kvTransfersReceived": e.stats.kv_transfers_received_total,
                "requestsAborted": e.stats.requests_aborted_total,
                "prefixCacheHitTokens": e.stats.prefix_cache_hit_tokens_total,
                "energyJoules": e.energy_j_now(),
                "conversationTurns": dict(e.stats.conversation_turns),
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await _json_object(request)
            sim, remote_decode = self._admit(body, chat, request.headers.get(CONVERSATION_HEADER) or None)
        except (_BadRequest, RequestRejected) as err:
            return _error(400, str(err))
        rid = ("chatcmpl-" if chat else "cmpl-") + sim.request_id
        created, model = int(time.time()), str(body.get("model") or self.config.model)
        answer = _Answer(
            chat,
            sim,
            self._kv_transfer_params(rid, sim.prompt_tokens) if remote_decode else None,
            {SERVER_HEADER: self.config.name or f"{self.config.host}:{self.port}"},
        )
        if not body.get("stream"):
            obj = "chat.completion" if chat else "text_completion"
            return await answer.whole({"id": rid, "object": obj, "created": created, "model": model})
        obj = "chat.completion.chunk" if chat else "text_completion"
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        head = {"id": rid, "object": obj, "created": created, "model": model}
        try:
            return await answer.stream(request, head, include_usage)
        finally:
            if sim.generated_tokens < sim.max_tokens:  # the client went away mid-answer: abort, as vLLM does
                self.engine.abort(sim)

    def _admit(self, body: dict[str, Any], chat: bool, conversation_id: str | None) -> tuple[SimRequest, bool]:
        """The request submitted to the engine, and whether it is a prefill for a remote decoder."""
        prompt_tokens = prompt_tokens_of(body, chat)
        max_tokens = _max_tokens(body)
        kv_params = body.get("kv_transfer_params")
        kv_params = kv_params if isinstance(kv_params, dict) else {}
        remote_decode = bool(kv_params.get("do_remote_decode"))
        remote_tokens = 0
        if kv_params.get("do_remote_prefill"):
            blocks = _block_count(kv_params.get("remote_block_ids"))
            remote_tokens = min(prompt_tokens, blocks * BLOCK_TOKENS) if blocks else prompt_tokens
        if remote_decode:
            max_tokens = 1  # a prefill for a remote decoder produces only the first token
        sim = SimRequest(
            request_id=self.engine.next_request_id(),
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            conversation_id=conversation_id,
            remote_kv_tokens=remote_tokens,
        )
        self.engine.submit(sim)
        return sim, remote_decode

    def _kv_transfer_params(self, rid: str, prompt_tokens: int) -> dict[str, Any]:
        """The fields (and their order) of vLLM 0.32's NixlConnector prefill response; one KV cache group."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [remote_block_ids(prompt_tokens)],
            "remote_engine_id": self.engine_id,
            "remote_request_id": rid,
            "remote_host": self.config.host,
            "remote_port": self.port,
            "tp_size": self.config.gpu_count,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": prompt_tokens,
            "remote_blocks_expiry_time": None,
            "transfer_mode": "pull",
            "remote_prefill_cached_tokens": 0,
        }


class _BadRequest(Exception):
    """A request body the server cannot read (answered 400)."""


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise _BadRequest("body is not JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    return body


class _Answer:
    """The answer to one request, whole or streamed: `head` is the id, object, creation time and model every
    body or chunk starts with."""

    def __init__(
        self, chat: bool, sim: SimRequest, kv_transfer_params: dict[str, Any] | None, headers: dict[str, str]
    ) -> None:
        self.chat = chat
        self.sim = sim
        self.kv_transfer_params = kv_transfer_params  # a prefill for a remote decoder hands these on (at the end)
        self.headers = headers

    def usage(self, generated: int) -> dict[str, int]:
        prompt = self.sim.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    async def whole(self, head: dict[str, Any]) -> web.Response:
        """One JSON body, once every token is generated."""
        generated = 0
        while True:
            event = await self.sim.events.get()
            generated += event.tokens
            if event.finished:
                break
        text = FILLER_TOKEN * generated
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        payload: dict[str, Any] = {**head, "choices": [choice], "usage": self.usage(generated)}
        if self.kv_transfer_params is not None:
            payload["kv_transfer_params"] = self.kv_transfer_params
        return web.json_response(payload, headers=self.headers)

    async def stream(self, request: web.Request, head: dict[str, Any], include_usage: bool) -> web.StreamResponse:
        """Server-sent events, a chunk per engine event (the stream interval)."""
        response = web.StreamResponse(
            headers={**self.headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        generated = 0
        first = True
        while True:
            event = await self.sim.events.get()
            generated += event.tokens
            text = FILLER_TOKEN * event.tokens
            c: dict[str, Any] = {"index": 0, "finish_reason": "length" if event.finished else None}
            if self.chat:
                c["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
            else:
                c["text"] = text
            first = False
            chunk: dict[str, Any] = {**head, "choices": [c]}
            if event.finished and self.kv_transfer_params is not None:
                chunk["kv_transfer_params"] = self.kv_transfer_params
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if event.finished:
                break
        if include_usage:
            chunk = {**head, "choices": [], "usage": self.usage(generated)}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _block_count(blocks: Any) -> int:
    """Blocks in `remote_block_ids`: vLLM lists them per KV cache group (a list of lists); a flat list is one group."""
    if not isinstance(blocks, list):
        return 0
    groups = [g for g in blocks if isinstance(g, list)]
    return max((len(g) for g in groups), default=0) if groups else len(blocks)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)
