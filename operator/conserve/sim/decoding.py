"""The decoder side of the simulator: continuous batching, chunked append-prefill, memory pressure.

A decoder alternates two kinds of iteration. With no prompt to prefill it runs decode steps of its batch,
advanced in closed form while the batch does not change (`decode_run`); a run
ends when a sequence finishes, when memory runs out, or at the first step boundary after something arrives.
With prompts to prefill (a pinned or cached conversation's later turn, a recompute after preemption) it runs
mixed iterations, as vLLM's chunked prefill does: each takes at most `chunk_tokens` prompt tokens (first come
first served) and one decode step of the running batch, so a long prompt no longer stalls the batch for its
whole prefill. A mixed iteration is one fused batch (vLLM's chunked prefill, Sarathi-Serve): the decode step's
weight and KV reads overlap the chunks' compute, so it lasts the longer of the two (the decode step's own
FLOPs, at most a few percent of a full chunk's, are not added), plus any host reload of a prompt's cached
prefix before its first chunk. Prompt chunks draw prefill power (full activity); a decode step that outlasts
them draws its own power as well.
"""

from __future__ import annotations

from typing import Any

from conserve.core.llm import ModelShape
from conserve.core.offload import pcie_transfer_time_s
from conserve.core.perf import (
    PREFILL_ACTIVITY,
    decode_run,
    power_w,
)
from conserve.sim.instances import Decoder, fill_iteration, iteration_prefill_s
from conserve.sim.records import LocalJob, Seq
from conserve.sim.transfer import pcie_transfer_energy_j

#: Event kinds the decoder loop schedules (the engine's event loop dispatches them).
DECODER_WAKE = 3
POKE = 5


class DecoderLoop:
    """Mixed into `conserve.sim.engine.Simulator`: everything that happens inside one decoder."""

    now: float
    model: ModelShape
    pinned_evictions: int
    reloads: int
    transfer_energy_j: float

    def _push(self, t: float, kind: int, payload: Any) -> None:
        raise NotImplementedError

    def _turn_done(self, decoder: Decoder, seq: Seq) -> None:
        raise NotImplementedError

    def _offload_for(self, decoder: Decoder, tokens: int) -> bool:
        raise NotImplementedError

    def _enqueue_join(self, decoder: Decoder, seq: Seq) -> None:
        decoder.join_queue.append(seq)
        self._poke(decoder)

    def _enqueue_local(self, decoder: Decoder, job: LocalJob) -> None:
        decoder.local_queue.append(job)
        self._poke(decoder)

    def _poke(self, decoder: Decoder) -> None:
        """Something arrived: an idle decoder starts now; a decode run stops at its next step boundary (a mixed
        iteration is one step long already)."""
        if decoder.state == "idle":
            self._push(self.now, POKE, decoder)
        elif decoder.state == "run":
            elapsed = self.now - decoder.run_start
            run = decode_run(decoder.spec.device, self.model, decoder.run_batch, decoder.run_context)
            done = run.steps_within(decoder.run_steps, elapsed)
            if done < decoder.run_steps:
                stop = done + 1 if run.time_s(done) < elapsed else done
                if stop < decoder.run_steps:
                    decoder.run_steps = stop
                    decoder.version += 1
                    end = decoder.run_start + run.time_s(stop)
                    self._push(max(end, self.now), DECODER_WAKE, (decoder, decoder.version))

    def _kv_tick(self, decoder: Decoder) -> None:
        decoder.kv_token_seconds += decoder.live_tokens() * (self.now - decoder.last_kv_t)
        decoder.last_kv_t = self.now

    def _account_decode(self, decoder: Decoder, steps: int, batch: int, context: int, *, charge: bool = True) -> float:
        """Advance the running batch `steps` steps; returns their duration. `charge=False`: the steps rode in a
        fused iteration whose prompt chunks already account for its time and power."""
        device = decoder.spec.device
        run = decode_run(device, self.model, batch, context)
        duration = run.time_s(steps)
        if charge:
            energy = run.energy_j(steps)
            decoder.decode_s += duration
            decoder.dynamic_energy_j += energy - device.idle_power_w * duration
        decoder.generated_tokens += steps * batch
        decoder.decode_steps += steps
        # KV integral: the running KV grows linearly by batch x steps over the run (the tick counts its start).
        self._kv_tick(decoder)
        decoder.kv_token_seconds += batch * steps / 2.0 * duration
        for seq in decoder.running:
            seq.context += steps
            seq.remaining -= steps
            seq.record.generated_tokens += steps
        decoder.running_tokens += steps * batch
        decoder.note_peak()
        return duration

    def _finish_run(self, decoder: Decoder) -> None:
        self._account_decode(decoder, decoder.run_steps, decoder.run_batch, decoder.run_context)
        decoder.state = "idle"

    def _chunk_times(self, decoder: Decoder) -> tuple[float, float]:
        """(reload seconds, prefill seconds) of the running mixed iteration's prompt chunks."""
        device = decoder.spec.device
        reload = sum(pcie_transfer_time_s(self.model, j.reload_tokens) for j, _ in decoder.iteration if not j.reloaded)
        compute = iteration_prefill_s(
            device, self.model, [(take, j.cached_tokens + j.done_tokens) for j, take in decoder.iteration]
        )
        return reload, compute

    def _finish_iteration(self, decoder: Decoder) -> None:
        device = decoder.spec.device
        reload, compute = self._chunk_times(decoder)
        self._kv_tick(decoder)
        decoder.prefill_s += compute + reload
        decoder.dynamic_energy_j += (power_w(device, PREFILL_ACTIVITY) - device.idle_power_w) * compute
        if decoder.iteration_decodes:
            step = decode_run(device, self.model, decoder.run_batch, decoder.run_context).time_s(1)
            self._account_decode(decoder, 1, decoder.run_batch, decoder.run_context, charge=step > compute)
        for job, take in decoder.iteration:
            if not job.reloaded and job.reload_tokens:
                self.transfer_energy_j += pcie_transfer_energy_j(self.model, job.reload_tokens)
            job.reloaded = True
            job.done_tokens += take
            decoder.prefill_tokens += take
            job.seq.record.prefill_tokens += take
            if job.left_tokens > 0:
                continue
            seq = job.seq
            decoder.prefill_batch.remove(job)
            decoder.inflight_tokens -= seq.context
            decoder.running_tokens += seq.context
            if seq.record.first_token_s < 0:
                seq.record.first_token_s = self.now
                seq.record.generated_tokens = 1
            seq.admitted_order = next(decoder.admit_counter)
            decoder.running.append(seq)
        decoder.iteration = []
        decoder.state = "idle"

    def _decoder_boundary(self, decoder: Decoder) -> None:
        if decoder.state == "run":
            self._finish_run(decoder)
        elif decoder.state == "prefill":
            self._finish_iteration(decoder)
        # Finished sequences leave the batch.
        if any(s.remaining <= 0 for s in decoder.running):
            self._kv_tick(decoder)
            still: list[Seq] = []
            for seq in decoder.running:
                if seq.remaining <= 0:
                    decoder.running_tokens -= seq.context
                    self._turn_done(decoder, seq)
                else:
                    still.append(seq)
            decoder.running = still
        if decoder.state != "idle":  # a release above restarted this decoder already
            return
        if self._start_iteration(decoder):
            return
        self._admit_joins(decoder)
        self._start_run(decoder)

    def _admit_local(self, decoder: Decoder) -> None:
        """Local prompts join the prefill batch while their KV fits (the whole context is reserved up front)."""
        self._kv_tick(decoder)
        while decoder.local_queue and len(decoder.running) + len(decoder.prefill_batch) < decoder.max_batch:
            job = decoder.local_queue[0]
            seq = job.seq
            key = seq.state.key
            gpu_held = 0 if job.recompute else min(decoder.peek_kv(key), seq.context)
            host_held = 0 if job.recompute or gpu_held else min(decoder.peek_host(key), seq.context)
            held = gpu_held or host_held
            if not job.recompute and held < job.cached_tokens:
                # Only part of the prefix is here (a turn's last output token has no KV until the next turn's
                # prefill writes it), or none of it (evicted): prefill what is missing.
                job.new_tokens, job.cached_tokens = seq.context - held, held
                job.recompute = held == 0
            need = seq.context - gpu_held + self._growth_room(decoder)
            if not decoder.evict_for(need, keep=key) and not self._offload_for(decoder, need):
                if decoder.running or decoder.prefill_batch:
                    break
                self.pinned_evictions += decoder.evict_pinned_for(need, keep=key)
                if decoder.free_tokens() < need:
                    break
            if not job.recompute and host_held and decoder.peek_host(key):
                job.reload_tokens = host_held
                seq.record.reload_tokens += host_held
                seq.record.reload_s += pcie_transfer_time_s(self.model, host_held)
                self.reloads += 1
            decoder.take_kv(key)
            decoder.local_queue.popleft()
            decoder.inflight_tokens += seq.context
            decoder.note_peak()
            decoder.prefill_batch.append(job)

    def _start_iteration(self, decoder: Decoder) -> bool:
        """A mixed iteration: the next prompt chunks (first come first served) and one decode step."""
        self._admit_local(decoder)
        if not decoder.prefill_batch:
            return False
        self._admit_joins(decoder)
        steps = self._fit_steps(decoder, 1) if decoder.running else 0
        decoder.iteration = fill_iteration(decoder.prefill_batch, decoder.chunk_tokens)
        reload, compute = self._chunk_times(decoder)
        decoder.iteration_decodes = steps > 0 and bool(decoder.running)
        duration = reload + compute
        if decoder.iteration_decodes:
            decoder.run_batch = len(decoder.running)
            decoder.run_context = decoder.running_tokens
            step = decode_run(decoder.spec.device, self.model, decoder.run_batch, decoder.run_context).time_s(1)
            duration = reload + max(compute, step)
        decoder.state = "prefill"
        decoder.version += 1
        self._push(self.now + duration, DECODER_WAKE, (decoder, decoder.version))
        return True

    def _admit_joins(self, decoder: Decoder) -> None:
        self._kv_tick(decoder)
        while decoder.join_queue and len(decoder.running) + len(decoder.prefill_batch) < decoder.max_batch:
            seq = decoder.join_queue[0]
            decoder.take_kv(seq.state.key)  # an older copy of this conversation's KV is superseded
            need = seq.context + self._growth_room(decoder)
            if not decoder.evict_for(need) and not self._offload_for(decoder, need):
                if decoder.running or decoder.prefill_batch:
                    break
                self.pinned_evictions += decoder.evict_pinned_for(seq.context)
                if decoder.free_tokens() < seq.context:
                    break
            decoder.join_queue.popleft()
            seq.admitted_order = next(decoder.admit_counter)
            decoder.running.append(seq)
            decoder.running_tokens += seq.context
            decoder.note_peak()

    @staticmethod
    def _growth_room(decoder: Decoder) -> int:
        """KV a new sequence leaves free when others are held: one decode step for each of them and itself (vLLM's
        admission watermark). Without it, two sequences that together fill the decoder preempt each other in turn
        forever, each admitted into the room the other's preemption freed and preempted before its first step."""
        held = len(decoder.running) + len(decoder.prefill_batch)
        return held + 1 if held else 0

    def _fit_steps(self, decoder: Decoder, steps: int) -> int:
        """How many of `steps` decode steps fit in memory (evicting cache, offloading, preempting); 0: none run."""
        while decoder.running:
            batch = len(decoder.running)
            fit = decoder.free_tokens() // batch
            if fit < steps and decoder.cache:
                decoder.evict_for(batch * steps)
                fit = decoder.free_tokens() // batch
            if fit < steps and decoder.pinned:
                self._offload_for(decoder, batch * steps)
                fit = decoder.free_tokens() // batch
            if fit >= 1:
                return min(steps, fit)
            if len(decoder.running) == 1 and not decoder.prefill_batch:
                # Preempting the only sequence would only recompute it into the same corner: drop idle pinned
                # KV instead (the last resort, counted). The up-front check (no conversation outgrows a decoder)
                # makes room certain once nothing else is held.
                if not decoder.pinned:
                    raise AssertionError(f"decoder {decoder.name}: one sequence cannot grow ({decoder.used_tokens})")
                self.pinned_evictions += decoder.evict_pinned_for(batch * steps)
                continue
            self._preempt(decoder)
        return 0

    def _start_run(self, decoder: Decoder) -> None:
        # One-token turns (remaining 0 after prefill) finish at once.
        if any(s.remaining <= 0 for s in decoder.running):
            self._decoder_boundary(decoder)
            return
        steps = self._fit_steps(decoder, min((s.remaining for s in decoder.running), default=0))
        if not decoder.running or steps <= 0:
            if decoder.local_queue and self._start_iteration(decoder):
                return
            decoder.state = "idle"
            return
        decoder.state = "run"
        decoder.run_start = self.now
        decoder.run_batch = len(decoder.running)
        decoder.run_context = decoder.running_tokens
        decoder.run_steps = steps
        decoder.version += 1
        end = self.now + decode_run(decoder.spec.device, self.model, decoder.run_batch, decoder.run_context).time_s(
            steps
        )
        self._push(end, DECODER_WAKE, (decoder, decoder.version))

    def _preempt(self, decoder: Decoder) -> None:
        """Drop the most recently admitted sequence's KV; it is prefilled again (recompute) before continuing."""
        self._kv_tick(decoder)
        victim = max(decoder.running, key=lambda s: s.admitted_order)
        decoder.running.remove(victim)
        decoder.running_tokens -= victim.context
        decoder.preemptions += 1
        victim.record.preemptions += 1
        decoder.local_queue.appendleft(LocalJob(victim, victim.context, 0, recompute=True))
