"""Every conserve_* metric follows the naming rules: prefix, base unit in the name, _total on counters."""

from __future__ import annotations

from conserve import metrics

UNITS = ("_seconds", "_joules", "_tokens", "_watts", "_bytes", "_total", "_conversations", "_decoders", "_ratio")


def test_metric_names() -> None:
    families = list(metrics.REGISTRY.collect())
    assert families
    for family in families:
        assert family.name.startswith("conserve_"), family.name
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples) or not family.samples, family.name
        assert family.documentation, family.name
    names = {f.name for f in families}
    for wanted in (
        "conserve_placements",
        "conserve_placement_latency_seconds",
        "conserve_pending_conversations",
        "conserve_reserved_kv_tokens",
        "conserve_live_kv_tokens",
        "conserve_kv_transfers",
    ):
        assert wanted in names, wanted


def test_forget_pool_drops_series() -> None:
    metrics.QUEUE_LENGTH.labels("ns-x", "pool-x").set(3)
    metrics.forget_pool("ns-x", "pool-x")
    samples = [s for f in metrics.REGISTRY.collect() for s in f.samples if s.labels.get("pool") == "pool-x"]
    assert not [s for s in samples if s.name == "conserve_pending_conversations"]
