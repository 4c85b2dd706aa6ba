"""Where the energy loop's GPU readings come from and how often it runs: its options and their flags.

Light on purpose: `conserve operator` and `conserve energy` build their parsers from here, and `conserve --help`
must not load the readers' libraries (aiohttp, the Kubernetes client); `conserve.energy.sources` builds the
reader the options ask for."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

SOURCES = ("dcgm", "nvml", "none")


@dataclass(frozen=True, slots=True)
class EnergyOptions:
    """Where GPU readings come from and how often the loop runs."""

    source: str = "dcgm"  # "dcgm", "nvml" or "none"
    interval_s: float = 10.0
    dcgm_urls: tuple[str, ...] = ()
    dcgm_service: str = ""  # NAMESPACE/NAME
    dcgm_pod_selector: str = ""  # NAMESPACE/LABEL-SELECTOR
    dcgm_port: int = 9400

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EnergyOptions:
        return cls(
            args.energy_source,
            args.energy_interval_seconds,
            tuple(args.dcgm_url),
            args.dcgm_service,
            args.dcgm_pod_selector,
            args.dcgm_port,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The energy loop's flags (the operator's command adds them too, then `EnergyOptions.from_args`)."""
    group = parser.add_argument_group("energy")
    group.add_argument("--energy-source", choices=list(SOURCES), default="dcgm")
    group.add_argument("--energy-interval-seconds", type=float, default=10.0)
    group.add_argument("--dcgm-url", action="append", default=[], help="a dcgm-exporter /metrics URL (repeatable)")
    group.add_argument(
        "--dcgm-service", default="", help="NAMESPACE/NAME of the dcgm-exporter Service (its endpoints are scraped)"
    )
    group.add_argument(
        "--dcgm-pod-selector",
        default="",
        help="NAMESPACE/LABEL-SELECTOR of the dcgm-exporter pods, e.g. gpu-operator/app=nvidia-dcgm-exporter",
    )
    group.add_argument("--dcgm-port", type=int, default=9400, help="port when the Service does not name one")
