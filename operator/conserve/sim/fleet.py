"""The simulated fleet, read from a small YAML file (see `fleets/default.yaml`).

Tier mapping ON uses the file's `tiered` groups (prefill on compute-tier GPUs, decode on bandwidth-tier GPUs).
Tier mapping OFF makes the same fleet homogeneous: the same groups, instance counts and tensor-parallel degrees
(so the same number of GPUs), every GPU replaced by the `homogeneous.gpu` product. "Same fleet" therefore means
same GPU count, not same price; the default file maps 2 x H100 prefill + 4 x H200 decode to 6 x H100 (the H100
and the H200 have the same TDP, 700 W, and the same compute; the H200 has more memory and bandwidth).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from conserve.core.engine_profiles import DEFAULT_PROFILE, PROFILES, EngineProfile
from conserve.core.gpus import CATALOG, Role, Tier
from conserve.core.llm import MODELS, ModelShape, kv_capacity_tokens
from conserve.core.offload import HOST_KV_BYTES_PER_GPU
from conserve.core.perf import LINKS, Device, Link

DEFAULT_CHUNK_TOKENS = 8192


class FleetError(ValueError):
    """A fleet file that cannot be used."""


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    name: str
    role: Role
    gpu: str
    tp: int
    device: Device

    @property
    def tier(self) -> Tier:
        return self.device.gpu.tier


@dataclass(frozen=True, slots=True)
class Fleet:
    name: str
    model: ModelShape
    link: Link
    gpu_memory_fraction: float
    max_batch_size: int
    prefill: tuple[InstanceSpec, ...]
    decode: tuple[InstanceSpec, ...]
    tiered: bool
    #: Host DRAM per GPU given to KV offload (`conserve.core.offload.HOST_KV_BYTES_PER_GPU`); 0 turns it off.
    host_kv_bytes_per_gpu: float = HOST_KV_BYTES_PER_GPU
    #: Prompt tokens per iteration on prefill instances (chunked prefill) and decoders (chunked append-prefill):
    #: vLLM's `max_num_batched_tokens` default for its OpenAI server (8192).
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    #: Prefill instances keep the KV of what they prefilled (LRU) and reuse it for a conversation's next turn.
    prefill_prefix_cache: bool = False
    #: A fleet-wide KV store (Mooncake's KVCache pool) of this many bytes: decoders write every finished turn's
    #: KV there and prefill instances load a conversation's prefix from it over the link; 0 turns it off.
    shared_kv_store_bytes: float = 0.0
    #: The serving engine's profile (core/engine_profiles.py): its overheads and efficiencies, every instance.
    engine_profile: EngineProfile = PROFILES[DEFAULT_PROFILE]

    def kv_capacity_tokens(self, instance: InstanceSpec) -> int:
        return kv_capacity_tokens(
            gpu_memory_bytes=instance.device.gpu.memory_bytes,
            gpu_count=instance.tp,
            model=self.model,
            memory_fraction=self.gpu_memory_fraction,
        )

    @property
    def gpu_count(self) -> int:
        return sum(i.tp for i in (*self.prefill, *self.decode))

    def describe(self) -> str:
        def groups(instances: tuple[InstanceSpec, ...]) -> str:
            counts: dict[tuple[str, int], int] = {}
            for i in instances:
                counts[(i.gpu, i.tp)] = counts.get((i.gpu, i.tp), 0) + 1
            return " + ".join(f"{n}x{gpu}" + (f"(tp{tp})" if tp > 1 else "") for (gpu, tp), n in counts.items())

        return (
            f"prefill {groups(self.prefill)}, decode {groups(self.decode)}, {self.model.name}, {self.link.name}, "
            f"engine {self.engine_profile.name}"
        )


@dataclass(frozen=True, slots=True)
class FleetFile:
    path: str
    raw: dict[str, Any]

    def build(self, *, tiered: bool, decode_gpu: str | None = None, decode_count: int | None = None) -> Fleet:
        """The fleet; `decode_gpu`/`decode_count` replace the decode groups by one group (sweeps of tiers)."""
        raw = self.raw
        if decode_gpu is not None or decode_count is not None:
            tiers = dict(raw["tiered"])
            groups = tiers["decode"]
            gpu = decode_gpu or str(groups[0].get("gpu", "H200"))
            count = decode_count or sum(int(g.get("count", 1)) for g in groups)
            tiers["decode"] = [{"gpu": gpu, "count": count, "tp": int(groups[0].get("tp", 1))}]
            raw = {**raw, "tiered": tiers}
        return build_fleet(raw, tiered=tiered, source=self.path)


def load_fleet_file(path: Path | None = None) -> FleetFile:
    if path is None:
        text = resources.files("conserve.sim").joinpath("fleets/default.yaml").read_text(encoding="utf-8")
        source = "default.yaml"
    else:
        text = path.read_text(encoding="utf-8")
        source = str(path)
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise FleetError(f"{source}: not a mapping")
    file = FleetFile(source, raw)
    file.build(tiered=True)  # validate both shapes now
    file.build(tiered=False)
    return file


def _known(name: str, table: Mapping[str, object], what: str, source: str) -> str:
    if name not in table:
        raise FleetError(f"{source}: unknown {what} {name!r} (known: {', '.join(table)})")
    return name


def _non_negative(raw: dict[str, Any], key: str, default: float, source: str) -> float:
    value = float(raw.get(key, default))
    if value < 0:
        raise FleetError(f"{source}: {key} must be >= 0")
    return value


def _groups(raw: Any, role: str, source: str) -> list[tuple[str, int, int]]:
    if not isinstance(raw, list) or not raw:
        raise FleetError(f"{source}: tiered.{role} must be a non-empty list of groups")
    out: list[tuple[str, int, int]] = []
    for g in raw:
        if not isinstance(g, dict):
            raise FleetError(f"{source}: tiered.{role}: each group is a mapping with gpu, count, tp")
        gpu = _known(str(g.get("gpu", "")).upper(), CATALOG, "GPU", source)
        count, tp = g.get("count", 1), g.get("tp", 1)
        if not isinstance(count, int) or not isinstance(tp, int) or count < 1 or tp < 1:
            raise FleetError(f"{source}: count and tp must be positive integers")
        out.append((gpu, count, tp))
    return out


def _instances(
    role: Role, groups: list[tuple[str, int, int]], flat_gpu: str | None, profile: EngineProfile
) -> tuple[InstanceSpec, ...]:
    """One instance per count of each group, named by role, index and product; `flat_gpu` replaces every GPU."""
    out: list[InstanceSpec] = []
    for gpu, count, tp in groups:
        product = flat_gpu or gpu
        for _ in range(count):
            name = f"{'p' if role is Role.PREFILL else 'd'}{len(out)}-{product.lower()}"
            device = Device(CATALOG[product], tp, params=profile.params)
            out.append(InstanceSpec(name, role, product, tp, device))
    return tuple(out)


def build_fleet(raw: dict[str, Any], *, tiered: bool, source: str = "<fleet>") -> Fleet:
    model = MODELS[_known(str(raw.get("model", "llama-3-8b")), MODELS, "model", source)]
    link = LINKS[_known(str(raw.get("link", "rdma")), LINKS, "link", source)]
    fraction = float(raw.get("gpu_memory_fraction", 0.9))
    max_batch = int(raw.get("max_batch_size", 256))
    host_gb = _non_negative(raw, "host_kv_gb_per_gpu", HOST_KV_BYTES_PER_GPU / 1e9, source)
    chunk = raw.get("chunk_tokens", DEFAULT_CHUNK_TOKENS)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise FleetError(f"{source}: chunk_tokens must be a positive integer")
    store_gb = _non_negative(raw, "shared_kv_store_gb", 0.0, source)
    profile = PROFILES[_known(str(raw.get("engine_profile", DEFAULT_PROFILE)), PROFILES, "engine_profile", source)]
    tiers = raw.get("tiered")
    if not isinstance(tiers, dict):
        raise FleetError(f"{source}: missing 'tiered' with prefill and decode groups")
    homogeneous = raw.get("homogeneous") or {}
    if not isinstance(homogeneous, dict):
        raise FleetError(f"{source}: 'homogeneous' must be a mapping with gpu")
    flat_gpu = _known(str(homogeneous.get("gpu", "H100")).upper(), CATALOG, "homogeneous GPU", source)
    prefill, decode = (
        _instances(role, _groups(tiers.get(role.value), role.value, source), None if tiered else flat_gpu, profile)
        for role in (Role.PREFILL, Role.DECODE)
    )
    fleet = Fleet(
        "tiered" if tiered else "homogeneous",
        model,
        link,
        fraction,
        max_batch,
        prefill,
        decode,
        tiered,
        host_gb * 1e9,
        chunk,
        bool(raw.get("prefill_prefix_cache", False)),
        store_gb * 1e9,
        profile,
    )
    for d in fleet.decode:
        if fleet.kv_capacity_tokens(d) <= 0:
            raise FleetError(f"{source}: {model.name} does not fit on decoder {d.name} ({d.gpu} x{d.tp})")
    return fleet
