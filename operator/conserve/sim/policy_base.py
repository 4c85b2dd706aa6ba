"""What every simulator policy shares: the binding to the simulation and the do-nothing defaults."""

from __future__ import annotations

from conserve.core.pd import PdSettings
from conserve.core.slo import SloClass
from conserve.sim.pd import fleet_pd_settings
from conserve.sim.records import ConvState, Retain, SimView, TurnRecord


class PolicyBase:
    name = "base"
    #: Whether this policy's decoders get the fleet's host KV tier.
    host_offload = True
    owns_idle_timeout = False
    sweep_interval_s: float | None = None
    #: True: the policy's own P/D rule (`native_rule`), else the shared decider (`conserve.core.pd`).
    native = False
    native_rule = "the shared P/D decider"

    def __init__(self) -> None:
        self._sim: SimView | None = None
        self.pd = PdSettings()
        self.slo: SloClass | None = None

    def set_slo(self, slo: SloClass | None) -> None:
        self.slo = slo

    @property
    def pd_rule(self) -> str:
        """Which P/D rule this policy runs (reported per run)."""
        return f"native: {self.native_rule}" if self.native else f"decider: {self.pd.rule.value}"

    @property
    def sim(self) -> SimView:
        assert self._sim is not None, "policy not bound to a simulator"
        return self._sim

    def bind(self, sim: SimView, idle_timeout_s: float | None = None) -> None:
        self._sim = sim
        self.pd = fleet_pd_settings(sim, self.pd)

    def sweep(self, now: float) -> object:
        return None

    def least_loaded_prefill(self, now: float) -> str:
        return min(self.sim.prefill.values(), key=lambda p: (p.load_s(now), p.name)).name

    def retain(self, state: ConvState, decoder: str) -> Retain:
        return "cache"

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None:
        return None

    def release(self, state: ConvState, now: float) -> None:
        return None

    def kv_offloaded(self, state: ConvState) -> None:
        return None
