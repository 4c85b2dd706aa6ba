"""The shipped scheduler profile and the `conserve extender` command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from conserve.core.node_scoring import NodeWeights
from conserve.core.placement import TierPolicy
from conserve.extender.cli import add_parser, parse_weights, settings_from_args

pytestmark = pytest.mark.unit

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "scheduler" / "kube-scheduler-config.yaml"


def test_scheduler_profile_calls_the_extender() -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    assert (cfg["apiVersion"], cfg["kind"]) == ("kubescheduler.config.k8s.io/v1", "KubeSchedulerConfiguration")
    assert [p["schedulerName"] for p in cfg["profiles"]] == ["conserve-scheduler"]
    (extender,) = cfg["extenders"]
    assert extender["filterVerb"] == "filter"
    assert extender["prioritizeVerb"] == "prioritize"
    assert "bindVerb" not in extender
    assert "preemptVerb" not in extender
    assert extender["nodeCacheCapable"] is True
    assert extender["ignorable"] is False
    assert extender["managedResources"] == [{"name": "nvidia.com/gpu", "ignoredByScheduler": False}]
    assert extender["weight"] >= 1
    assert extender["urlPrefix"].endswith("/")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["extender", *argv])


def test_command_line_defaults_and_settings() -> None:
    args = parse()
    assert (args.host, args.port, args.node_cache_capable) == ("127.0.0.1", 8888, True)
    settings = settings_from_args(args)
    assert settings.scoring.tier_policy is TierPolicy.STRICT
    assert settings.scheduler_names == frozenset({"conserve-scheduler"})
    args = parse("--tier-policy", "preferred", "--weights", "tier=2,energy=0", "--scheduler-name", "*")
    settings = settings_from_args(args)
    assert settings.scoring.tier_policy is TierPolicy.PREFERRED
    assert settings.scoring.weights == NodeWeights(tier=2.0, energy=0.0)
    assert settings.scheduler_names == frozenset()
    assert parse("--no-node-cache-capable").node_cache_capable is False


@pytest.mark.parametrize("text", ["tier", "tier=x", "colour=1", "tier=-1"])
def test_bad_weights(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_weights(text)
