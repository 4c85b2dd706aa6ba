"""The synthetic agentic workload (seeded).

Conversations arrive as a Poisson process. Each starts with a system/task prompt, runs several tool-call turns
(the model emits a tool call; the tool runs for a while; its result is appended to the context), then produces
its first user-visible answer, then the user may ask follow-ups after a think time. The context grows with every
turn. Distribution parameters are in `AgenticParams`; they are chosen to describe a typical coding/search agent
(a few thousand tokens of instructions, 2-6 tool calls of one to a few hundred tokens each, tool outputs of
several hundred to a few thousand tokens, tool latencies of seconds, user think times of tens of seconds), not
fitted to any trace and not tuned to any result.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from conserve.sim.conversations import Conversation, Signals, Turn, Workload


@dataclass(frozen=True, slots=True)
class AgenticParams:
    """Distributions of the synthetic agentic workload (log-normal by median and sigma of the log).

    Where each value comes from (none is fitted to a trace, none was changed after seeing a result):
    - `conversations_per_s` = 2.0: the load level. At the first value (0.5/s) the default fleet's decoders held
      1.4% of their KV capacity and ran batches of a few sequences, far below how a provisioned fleet runs;
      2/s is the lowest round rate at which decode batches reach tens of sequences. `--load-scale` and
      `--sweep-load` move it (2x is 4/s).
    - System/task prompt 3,000 tokens (sigma 0.5): the order of published coding-agent system prompts with
      tool schemas (a few thousand tokens). A convention.
    - 2-6 tool calls of ~120 output tokens (a JSON function call), tool results ~800 tokens (sigma 1.0: a file
      excerpt, a search page; long-tailed), tool latency ~1.5 s (sigma 0.8: a shell command or an HTTP call).
      Conventions describing a coding/search agent.
    - Answers ~350 tokens, up to 3 follow-ups of ~60-token user messages after ~30 s of reading/thinking
      (sigma 0.8): conventions for interactive chat, of the order of the Mooncake trace's output lengths.
    - Contexts stop growing at 120,000 tokens (below Llama-3's 128k window).
    - The workload carries an end-of-conversation signal: an agent knows when its task is done.
    No public agentic trace with tool-call turns was available to this benchmark offline; when one is, it can
    be replayed as a Mooncake-format file (`--workload PATH`).
    """

    conversations_per_s: float = 2.0
    system_prompt_median_tokens: float = 3000.0
    system_prompt_sigma: float = 0.5
    tool_turns_min: int = 2
    tool_turns_max: int = 6
    tool_call_output_median_tokens: float = 120.0
    tool_call_output_sigma: float = 0.6
    tool_result_median_tokens: float = 800.0
    tool_result_sigma: float = 1.0
    tool_latency_median_s: float = 1.5
    tool_latency_sigma: float = 0.8
    answer_output_median_tokens: float = 350.0
    answer_output_sigma: float = 0.7
    followups_max: int = 3
    user_think_median_s: float = 30.0
    user_think_sigma: float = 0.8
    user_message_median_tokens: float = 60.0
    user_message_sigma: float = 0.8
    max_context_tokens: int = 120_000


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int = 1) -> int:
    return max(low, round(rng.lognormvariate(math.log(median), sigma)))


def synthesize_agentic(seed: int, duration_s: float, params: AgenticParams | None = None) -> Workload:
    p = params or AgenticParams()
    rng = random.Random(seed)
    conversations: list[Conversation] = []
    t = 0.0
    index = 0
    while True:
        t += rng.expovariate(p.conversations_per_s)
        if t >= duration_s:
            break
        turns: list[Turn] = []
        context = _lognormal_int(rng, p.system_prompt_median_tokens, p.system_prompt_sigma, 64)
        new = context
        think = 0.0
        for _ in range(rng.randint(p.tool_turns_min, p.tool_turns_max)):
            out = _lognormal_int(rng, p.tool_call_output_median_tokens, p.tool_call_output_sigma, 8)
            turns.append(Turn(context, new, out, None if turns else t, think, user_visible=False))
            result = _lognormal_int(rng, p.tool_result_median_tokens, p.tool_result_sigma, 16)
            context, new = context + out + result, result
            think = rng.lognormvariate(math.log(p.tool_latency_median_s), p.tool_latency_sigma)
        for _ in range(1 + rng.randint(0, p.followups_max)):
            if context >= p.max_context_tokens:
                break
            out = _lognormal_int(rng, p.answer_output_median_tokens, p.answer_output_sigma, 8)
            turns.append(Turn(context, new, out, None, think, user_visible=True))
            message = _lognormal_int(rng, p.user_message_median_tokens, p.user_message_sigma, 4)
            context, new = context + out + message, message
            think = rng.lognormvariate(math.log(p.user_think_median_s), p.user_think_sigma)
        conversations.append(Conversation(f"ag-{index:05d}", t, tuple(turns)))
        index += 1
    return Workload("agentic", tuple(conversations), signals=Signals(end_of_conversation=True))
