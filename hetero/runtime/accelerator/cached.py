"""`CachedExperts`: a layer's routed experts with a dynamic pool on the accelerator. Every
expert is held by the CPU kernels; a pool of slots on the lane holds the experts an
`ExpertSlots` policy keeps resident (seeded with the plan's hot set). Each step, pairs whose
expert is resident run on the lane and the others on the CPU, at once; an expert the policy
admits is then copied into its slot on the lane's queue, after the step's own work there (a
miss is computed on the CPU, never waited for)."""

from __future__ import annotations

import torch
from torch import nn

from hetero.models.experts import ExpertBackend
from hetero.runtime.accelerator.lane import Lane
from hetero.runtime.accelerator.placed import LaneExperts
from hetero.runtime.assembler import SummedParts
from hetero.runtime.expert_cache import ExpertSlots
from placement.cost_model import streaming_is_faster
from placement.hardware import Hardware


class CachedExperts(ExpertBackend, nn.Module):
    """`cpu`: kernels over experts `held` (all but those on disk) in that order; `pool`: the
    lane's slots, slot i holding expert `slots.resident` put there (`slot_expert[i]`)."""

    def __init__(
        self,
        cpu: nn.Module,
        held: list[int],
        pool: LaneExperts,
        slots: ExpertSlots,
        num_experts: int,
        hardware: Hardware | None = None,
    ):
        super().__init__()
        self.hardware = hardware  # for the prefill choice: stream the CPU's experts or not
        self.streamed_steps = 0
        self.on_cpu, self.pool, self.slots = cpu, pool, slots
        self.num_experts = num_experts
        self._cpu_local = torch.full((num_experts,), -1, dtype=torch.long)
        self._cpu_local[held] = torch.arange(len(held))
        self.slot_expert = list(slots.resident)
        self._slot_of = torch.full((num_experts,), -1, dtype=torch.long)
        self._slot_of[self.slot_expert] = torch.arange(len(self.slot_expert))

    @property
    def lane(self) -> Lane:
        return self.pool.lane

    def submit(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> SummedParts:
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k]
        top_k = expert_ids.shape[1]
        ids = expert_ids.reshape(-1)
        weights = expert_weights.reshape(-1, 1)
        token = torch.arange(ids.numel()) // top_k  # pairs are token-major
        on_lane = self._slot_of[ids] >= 0
        started = []
        for mask, backend, local in (
            (~on_lane, self.on_cpu, self._cpu_local),  # the CPU first: it runs on its worker
            (on_lane, self.pool, self._slot_of),
        ):
            pairs = mask.nonzero().squeeze(1)
            if not pairs.numel():
                continue
            rows = token[pairs]
            routed = local[ids[pairs]][:, None]
            if backend is self.on_cpu and self.stream_misses(ids[pairs]):
                self.streamed_steps += 1
                handle = self.pool.submit_streamed(self.on_cpu, x[rows], routed, weights[pairs])
            else:
                handle = backend.submit(x[rows], routed, weights[pairs])
            started.append((rows, handle))
        self.slots.access(expert_ids.numpy())
        for expert, evicted in self.slots.admitted:
            self._fill(expert, evicted)
        return SummedParts(torch.zeros_like(x), started)

    def stream_misses(self, missed: torch.Tensor) -> bool:
        """Whether the CPU's pairs (their experts `missed` [pairs]) run sooner streamed to
        the lane: only a batch of many tokens (prefill) amortises the copies."""
        if self.hardware is None or missed.numel() <= len(self.slot_expert):
            return False
        experts = int(missed.unique().numel())
        held = self.on_cpu.num_experts
        pool = self.pool
        float_bytes = (pool.gate_up[0].numel() + pool.down[0].numel()) * pool.gate_up.element_size()
        params = pool.gate_up[0].numel() + pool.down[0].numel()
        return streaming_is_faster(
            experts * self.on_cpu.nbytes / held,
            experts * float_bytes,
            2.0 * params * missed.numel(),
            self.hardware,
        )

    def _fill(self, expert: int, evicted: int | None) -> None:
        """Copy `expert` into a slot (a free one, or `evicted`'s), queued on the lane after
        this step's work; routing sees it from the next step on."""
        if evicted is None:
            return  # the pool is full from the start: seeded to capacity (see `from_plan`)
        slot = int(self._slot_of[evicted])
        self._slot_of[evicted] = -1
        local = int(self._cpu_local[expert])
        self.lane.submit(self.pool.load_slot, slot, self.on_cpu, local)
        self._slot_of[expert] = slot
        self.slot_expert[slot] = expert
