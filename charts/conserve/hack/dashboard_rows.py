"""The dashboard's rows for what the product is judged on: latency against the SLO, KV lifecycle per decoder,
energy, the router, the servers' own vLLM metrics and the control plane's health.

Series that exist only once something happened (errors, refusals, KV moves) are shown as 0 until then (`or
vector(0)`), so an empty panel always means a broken query or a missing scrape, never a quiet system.
"""

from __future__ import annotations

from dashboard_layout import NOSEL, RATE, SEL, Layout, quantiles

P95 = (0.95,)
TTFT = "conserve_router_time_to_first_token_seconds"
TBT = "conserve_router_time_between_tokens_seconds"


def rate_by(by: str, metric: str, sel: str = SEL) -> str:
    """A counter's per-second rate summed by some labels."""
    return f"sum by ({by}) (rate({metric}{sel}{RATE}))"


def or_zero(expr: str) -> str:
    """The query, or a single 0 while the counter it reads has no series yet (nothing happened)."""
    return f"({expr}) or vector(0)"


def slo_row(g: Layout) -> None:
    """Router latency per routing mode (its histograms carry no pool) and SLO attainment per pool and class."""
    g.row("Latency against the SLO")
    g.timeseries(
        "TTFET by routing mode (p50, p95)",
        quantiles("conserve_router_time_to_first_effective_token_seconds", (0.5, 0.95), "mode", NOSEL),
        "s", 0, "A conversation's first request at the router to its first user-visible token.",
    )  # fmt: skip
    g.timeseries(
        "TTFT and TBT by routing mode (p95)",
        [
            *[(e, f"TTFT {leg}") for e, leg in quantiles(TTFT, P95, "mode", NOSEL)],
            *[(e, f"TBT {leg}") for e, leg in quantiles(TBT, P95, "mode", NOSEL)],
        ],
        "s", 12, "Per turn: arrival to first streamed token; time between streamed tokens.",
    )  # fmt: skip
    g.next_line(8)
    g.timeseries(
        "SLO attainment against target by pool and class",
        [
            (f"min by (pool, slo_class) (conserve_slo_attainment_ratio{SEL})", "{{pool}} {{slo_class}}"),
            (f"max by (pool) (conserve_slo_target_attainment_ratio{SEL})", "{{pool}} target"),
        ],
        "percentunit", 0, "Share of ended conversations whose every turn met the SLO, and the declared target.",
    )  # fmt: skip
    g.timeseries(
        "Turns by SLO outcome; admission refusals",
        [
            (rate_by("pool, slo_class, outcome", "conserve_router_slo_turns_total", NOSEL), "{{pool}} {{slo_class}} "
             "{{outcome}}"),
            (or_zero(rate_by("pool, slo_class, reason", "conserve_refused_conversations_total")), "refused {{pool}} "
             "{{slo_class}} {{reason}}"),
        ],
        "ops", 12, "Served turns that met or missed their SLO per second; conversations the operator refused.",
    )  # fmt: skip
    g.next_line(8)


def kv_lifecycle_row(g: Layout) -> None:
    g.row("KV lifecycle per decoder")
    g.timeseries(
        "KV usage per decoder (engine-reported)",
        [(f"max by (pool, decoder) (conserve_observed_kv_usage_ratio{SEL})", "{{pool}} {{decoder}}")],
        "percentunit", 0, "Each decoder's KV cache usage as its engine reports it (vllm:kv_cache_usage_perc).",
    )  # fmt: skip
    g.timeseries(
        "KV tokens by lifecycle state",
        [(f"sum by (pool, state) (conserve_kv_state_kv_tokens{SEL})", "{{pool}} {{state}}")],
        "short", 12, "Live KV of pinned conversations: Active and Idle on the GPUs, Offloaded in host memory.",
    )  # fmt: skip
    g.next_line(8)
    g.timeseries(
        "Conversations by KV state",
        [(f"sum by (pool, state) (conserve_kv_state_conversations{SEL})", "{{pool}} {{state}}")],
        "short", 0, "Pinned conversations per KV state (Active, Idle, Offloaded, Dropped).",
    )  # fmt: skip
    g.timeseries(
        "KV lifecycle transitions",
        [(or_zero(rate_by("transition, reason", "conserve_kv_lifecycle_transitions_total")), "{{transition}} "
          "{{reason}}")],
        "ops", 12, "Idled, offloaded, reloaded, dropped and re-prefilled conversations per second.",
    )  # fmt: skip
    g.next_line(8)


# The pool of each serving pod, from the operator's per-pod power series (1 per pod; the value is not used).
_POD_POOL = (
    'max by (namespace, pool, pod) (label_replace(conserve_decoder_power_watts{sel}, "pod", "$1", "decoder", "(.+)"))'
    " * 0 + 1"
)


def energy_row(g: Layout) -> None:
    g.row("Energy")
    tokens = (
        f"sum by (namespace, pool) ({rate_by('namespace, pod', 'vllm:generation_tokens_total')}"
        f" * on (namespace, pod) group_left (pool) {_POD_POOL.format(sel=SEL)})"
    )
    g.timeseries(
        "Joules per output token by pool",
        [(f"sum by (namespace, pool) (rate(conserve_energy_joules_total{SEL}{RATE})) / {tokens}", "{{pool}}")],
        "J", 0, "The pool's serving pods' energy over the tokens their servers generated.",
    )  # fmt: skip
    g.timeseries(
        "Power by pool and serving pod",
        [
            (f"sum by (pool) (conserve_pool_power_watts{SEL})", "{{pool}}"),
            (f"sum by (decoder, role) (conserve_decoder_power_watts{SEL})", "{{decoder}} ({{role}})"),
        ],
        "watt", 12, "Power of each pool's serving pods' GPUs (DCGM or NVML), and of each pod.",
    )  # fmt: skip
    g.next_line(8)
    g.timeseries(
        "Energy attributed to conversations and left idle",
        [
            (rate_by("pool", "conserve_attributed_energy_joules_total"), "{{pool}} attributed"),
            (rate_by("pool", "conserve_unattributed_energy_joules_total"), "{{pool}} unattributed"),
        ],
        "watt", 0, "Joules per second the operator attributed to conversations, and idle capacity nobody holds.",
    )  # fmt: skip
    g.timeseries(
        "Energy per conversation (p50, p95)",
        quantiles("conserve_conversation_energy_joules", (0.5, 0.95), "pool"),
        "J", 12, "Energy of each conversation when it ended.",
    )  # fmt: skip
    g.next_line(8)


def router_row(g: Layout) -> None:
    g.row("Router")
    g.timeseries(
        "Turns by routing mode and prefill site",
        [
            (rate_by("mode", "conserve_router_turns_total", NOSEL), "{{mode}}"),
            (rate_by("mode, site, turn", "conserve_router_prefill_site_turns_total", NOSEL), "{{mode}} {{turn}} on "
             "{{site}}"),
        ],
        "ops", 0, "Turns served per second; where their prompt was prefilled (a prefill server or the decoder).",
    )  # fmt: skip
    g.timeseries(
        "Router errors",
        [
            (or_zero(rate_by("mode", "conserve_router_backend_errors_total", NOSEL)), "backend failed {{mode}}"),
            (or_zero(rate_by("status, reason", "conserve_router_unplaced_turns_total", NOSEL)), "{{status}} "
             "{{reason}}"),
        ],
        "ops", 12, "Servers that failed before answering (retried elsewhere); first turns answered 429 or 503.",
    )  # fmt: skip
    g.next_line(8)
    g.timeseries(
        "Placement wait of first turns (p50, p95)",
        quantiles("conserve_router_placement_wait_seconds", (0.5, 0.95), "part", NOSEL),
        "s", 0, "total: arrival to placement; create: the Conversation create call; exposed: beyond the prefill.",
    )  # fmt: skip
    g.timeseries(
        "KV hand-offs and usage patches",
        [
            (or_zero(rate_by("mode", "conserve_router_kv_transfers_total", NOSEL)), "KV hand-offs {{mode}}"),
            (f"sum(rate(conserve_router_usage_patches_total{NOSEL}{RATE}))", "usage patches"),
        ],
        "ops", 12, "Prefill-to-decoder KV moves the router asked for; batched usage patches to Conversations.",
    )  # fmt: skip
    g.next_line(8)


def servers_row(g: Layout) -> None:
    """The serving pods' own vllm:* metrics (vLLM, or gpu-sim answering like it), by pod."""
    g.row("Servers (vLLM metrics)")
    g.timeseries(
        "Running and waiting requests per server",
        [
            (f"sum by (pod) (vllm:num_requests_running{SEL})", "{{pod}} running"),
            (f"sum by (pod) (vllm:num_requests_waiting{SEL})", "{{pod}} waiting"),
        ],
        "short", 0, "Requests in each server's running batch, and waiting for admission.",
    )  # fmt: skip
    g.timeseries(
        "KV cache usage per server",
        [(f"max by (pod) (vllm:kv_cache_usage_perc{SEL})", "{{pod}}")],
        "percentunit", 12, "The engine's KV cache usage, 0 to 1.",
    )  # fmt: skip
    g.next_line(8)
    g.timeseries(
        "Tokens per second per server",
        [
            (rate_by("pod", "vllm:generation_tokens_total"), "{{pod}} generated"),
            (rate_by("pod", "vllm:prompt_tokens_total"), "{{pod}} prompt"),
        ],
        "short", 0, "Tokens generated and prompt tokens processed per second.",
    )  # fmt: skip
    g.timeseries(
        "Prefix cache hits and finished requests",
        [
            (rate_by("pod", "vllm:prefix_cache_hits_total"), "{{pod}} hit tokens"),
            (rate_by("pod", "vllm:request_success_total"), "{{pod}} finished"),
        ],
        "ops", 12, "Prompt tokens served from the prefix cache, and requests finished, per second.",
    )  # fmt: skip
    g.next_line(8)


def control_plane_row(g: Layout) -> None:
    """Operator leadership and its writes; the scheduler extender has its own row."""
    g.row("Control-plane health")
    g.stat("Shards led", "sum(conserve_operator_leading_shards)", "short", 0, "Shards the operator replicas lead.")
    g.stat("Shards configured", "max(conserve_operator_shards)", "short", 6, "Leases the pools are sharded over.")
    g.stat(
        "Status write errors/s",
        or_zero(f"sum(rate(conserve_status_write_errors_total{NOSEL}{RATE}))"),
        "ops", 12, "Status patches that failed after retries.",
    )  # fmt: skip
    g.stat(
        "Extender errors/s",
        or_zero(f'sum(rate(conserve_extender_requests_total{{outcome!="ok"}}{RATE}))'),
        "reqps", 18, "Scheduler calls the extender answered with bad_request or error.",
    )  # fmt: skip
    g.next_line(4)
    g.timeseries(
        "Operator API writes by resource and verb",
        [(rate_by("resource, verb", "conserve_api_writes_total", NOSEL), "{{resource}} {{verb}}")],
        "ops", 0, "Writes the operator sends to the API server per second.",
    )  # fmt: skip
    g.timeseries(
        "Operator replicas leading",
        [
            ("sum by (instance) (conserve_operator_leading_shards)", "{{instance}} leads"),
            ("max(conserve_operator_shards)", "configured"),
        ],
        "short", 12, "Shards each replica leads (0: a standby), against the shards configured.",
    )  # fmt: skip
    g.next_line(8)
