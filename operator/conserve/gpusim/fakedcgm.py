"""A dcgm-exporter look-alike for fake GPUs: the same exposition format and labels, power from a load model.

Each fake GPU (a target: pod, namespace, node, GPU index, product) draws `conserve.core.perf.power_w` of its
catalog GPU at the activity a load source gives (in [0, 1]: 0 idle, 0.5 a bandwidth-bound decode, 1 a
compute-bound prefill); its energy counter integrates that power over time on a ticker, in mJ, from a
deterministic since-boot offset. A GPU whose pod runs a GPU-server simulator (`conserve gpu-sim`) instead follows
that simulator's own energy counter (`conserve_gpusim_energy_joules_total`, the pod's share per GPU): the counter
advances by exactly the joules gpu-sim integrated over its steps, so DCGM-derived figures equal gpu-sim's over any
window (up to one scrape of lag). Sampling the simulator's power gauge every few seconds and holding it cannot do
that: a decode server's power changes every step (milliseconds), and the samples alias.
Served like dcgm-exporter 3.x/4.x with the Kubernetes pod mapping on
(`gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`, `Hostname`, `DCGM_FI_DRIVER_VERSION`, then `container`,
`namespace`, `pod` when a pod holds the GPU).

Load sources: a callable `(FakeGpu) -> activity`; `ConstantLoad`; and overrides set over HTTP
(`PUT /load {"<namespace>/<pod>" | "<UUID>": activity}`), which is how tests and demos move the power.
`conserve fake-dcgm` (`conserve.gpusim.fakedcgm_cluster`) serves it for a YAML list of targets or a cluster's GPUs.
Test infrastructure, beside gpu-sim: it shares gpu-sim's power model and metric names.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from conserve.core.gpus import CATALOG, GpuSpec, lookup_product
from conserve.core.perf import Device, power_w

log = logging.getLogger(__name__)

DRIVER_VERSION = "550.90.07"
#: Used when a product is not in the catalog: a 350 W board (L40S class).
FALLBACK_SPEC = CATALOG["L40S"]
#: Since-boot offset of each counter: about this long at idle power, so counters do not start at zero.
BOOT_IDLE_S = 3 * 24 * 3600


@dataclass(frozen=True, slots=True)
class FakeGpu:
    node: str
    gpu_index: int
    product: str  # a GFD product label ("NVIDIA-H200") or a driver name ("NVIDIA H200")
    pod: str = ""
    namespace: str = ""
    container: str = ""

    @property
    def uuid(self) -> str:
        digest = hashlib.sha256(f"{self.node}/{self.gpu_index}".encode()).hexdigest()
        return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"

    @property
    def model_name(self) -> str:
        # GFD builds its product label from the driver's name with spaces as dashes; undo that.
        return self.product.replace("-", " ")

    @property
    def spec(self) -> GpuSpec:
        return lookup_product(self.product) or FALLBACK_SPEC

    @property
    def pod_key(self) -> str:
        return f"{self.namespace}/{self.pod}" if self.pod else ""


LoadSource = Callable[[FakeGpu], float]
TargetSource = Callable[[], Sequence[FakeGpu]]
#: A GPU's cumulative energy (J) as an outside model counts it (a simulator's counter), or None: no such counter.
CounterSource = Callable[[FakeGpu], float | None]


@dataclass(frozen=True, slots=True)
class ConstantLoad:
    activity: float = 0.0

    def __call__(self, gpu: FakeGpu) -> float:
        return self.activity


@dataclass(slots=True)
class _GpuState:
    energy_mj: float
    power_w: float
    activity: float
    source_j: float | None = None  # the counter source's value at the last tick (None: integrating power)


def _boot_energy_mj(gpu: FakeGpu) -> float:
    jitter = int(gpu.uuid[4:12], 16) / 0xFFFFFFFF  # 0..1, stable per GPU
    return float(int(gpu.spec.idle_power_w * BOOT_IDLE_S * (1 + jitter) * 1000))


@dataclass
class FakeDcgmExporter:
    """The model behind the server: targets, their load, power and counters. The clock is injected."""

    targets: TargetSource
    load: LoadSource = field(default_factory=ConstantLoad)
    clock: Callable[[], float] = time.monotonic
    overrides: dict[str, float] = field(default_factory=dict)  # "<ns>/<pod>" or UUID -> activity
    #: Where a GPU's energy comes from a model's own counter (gpu-sim); an override still wins.
    counters: CounterSource | None = None
    _states: dict[str, _GpuState] = field(default_factory=dict)
    _last_tick_s: float | None = None

    def activity(self, gpu: FakeGpu) -> float:
        if gpu.uuid in self.overrides:
            value = self.overrides[gpu.uuid]
        elif gpu.pod_key and gpu.pod_key in self.overrides:
            value = self.overrides[gpu.pod_key]
        else:
            value = self.load(gpu)
        return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0

    def _overridden(self, gpu: FakeGpu) -> bool:
        return gpu.uuid in self.overrides or (bool(gpu.pod_key) and gpu.pod_key in self.overrides)

    def tick(self) -> list[tuple[FakeGpu, _GpuState]]:
        """Advance every GPU's counter since the last tick, then take its new load. Returns the GPUs' state.

        A GPU with a source counter (and no override) advances by the source's increase since the last tick (a
        source that went backwards restarted: its new value is what it drew since, the Prometheus rule); the first
        tick that sees the source only takes it as the baseline. Other GPUs integrate the power held since the
        last tick."""
        now_s = self.clock()
        elapsed_s = 0.0 if self._last_tick_s is None else max(now_s - self._last_tick_s, 0.0)
        self._last_tick_s = now_s
        out = []
        for gpu in self.targets():
            source_j = None if self.counters is None or self._overridden(gpu) else self.counters(gpu)
            if source_j is not None and not (math.isfinite(source_j) and source_j >= 0):
                source_j = None
            state = self._states.get(gpu.uuid)
            if state is None:
                state = _GpuState(_boot_energy_mj(gpu), gpu.spec.idle_power_w, 0.0)
                self._states[gpu.uuid] = state
            elif source_j is not None and state.source_j is not None:
                increase_j = source_j - state.source_j if source_j >= state.source_j else source_j
                state.energy_mj += increase_j * 1000.0
            else:
                state.energy_mj += state.power_w * elapsed_s * 1000.0  # power held since the last tick
            state.source_j = source_j
            state.activity = self.activity(gpu)
            state.power_w = power_w(Device(gpu.spec), state.activity)
            out.append((gpu, state))
        return out

    def render(self) -> str:
        """The /metrics page, as dcgm-exporter writes it."""
        gpus = self.tick()
        families: list[tuple[str, str, str, Callable[[FakeGpu, _GpuState], str]]] = [
            ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", lambda g, s: "1980"),
            ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda g, s: str(int(30 + 40 * s.activity))),
            ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", lambda g, s: f"{s.power_w:.6f}"),
            (
                "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                "counter",
                "Total energy consumption since boot (in mJ).",
                lambda g, s: str(int(s.energy_mj)),
            ),
            ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda g, s: str(round(100 * s.activity))),
            (
                "DCGM_FI_DEV_FB_USED",
                "gauge",
                "Framebuffer memory used (in MiB).",
                lambda g, s: str(int(g.spec.memory_bytes / 2**20 * 0.9)) if g.pod else "0",
            ),
        ]
        lines: list[str] = []
        for name, kind, help_text, value in families:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{{{_labels(gpu)}}} {value(gpu, state)}" for gpu, state in gpus)
        return "\n".join(lines) + "\n"


def _labels(gpu: FakeGpu) -> str:
    pairs = [
        ("gpu", str(gpu.gpu_index)),
        ("UUID", gpu.uuid),
        ("pci_bus_id", f"00000000:{0x18 + 0x10 * gpu.gpu_index:02X}:00.0"),
        ("device", f"nvidia{gpu.gpu_index}"),
        ("modelName", gpu.model_name),
        ("Hostname", gpu.node),
        ("DCGM_FI_DRIVER_VERSION", DRIVER_VERSION),
    ]
    if gpu.pod:
        pairs += [("container", gpu.container), ("namespace", gpu.namespace), ("pod", gpu.pod)]
    return ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _set_overrides(exporter: FakeDcgmExporter, body: object) -> None:
    """Apply a PUT /load body (key -> activity, `null` removes one), all or nothing."""
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object of key -> activity")
    for key, value in body.items():
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            raise web.HTTPBadRequest(text=f"activity of {key!r} must be a number or null")
    exporter.tick()  # close the interval at the old load before the new one applies
    for key, value in body.items():
        if value is None:
            exporter.overrides.pop(str(key), None)
        else:
            exporter.overrides[str(key)] = float(value)


def make_app(exporter: FakeDcgmExporter, *, tick_s: float = 1.0) -> web.Application:
    """GET /metrics, GET /health, PUT /load (activity overrides; `null` removes one)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=exporter.render(), content_type="text/plain", charset="utf-8")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def set_load(request: web.Request) -> web.Response:
        _set_overrides(exporter, await request.json())
        return web.json_response(exporter.overrides)

    async def ticker(app: web.Application) -> Any:
        async def run() -> None:
            while True:
                exporter.tick()
                await asyncio.sleep(tick_s)

        task = asyncio.create_task(run())
        yield
        task.cancel()

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_put("/load", set_load)
    app.cleanup_ctx.append(ticker)
    return app
