"""Host-side time per target pass: a generation's wall time minus the time its forward passes took.

On a GPU a target pass of a 1.5B-7B model takes a few milliseconds, so what a method does on the host
between passes (Python loops over tree nodes, full-vocabulary work, host copies, syncs) decides its
speed-up there. This measures that share on any device, with the harness's own pass counters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from harness.instrument import PassCounter, synchronize
from methods.base import DecodeContext, Method, Sampling


@dataclass(frozen=True)
class HostCost:
    wall_s: float
    forward_s: float  # target, draft and self-draft passes, timed by the hooks
    target_calls: int
    new_tokens: int

    @property
    def host_s(self) -> float:
        return max(0.0, self.wall_s - self.forward_s)

    @property
    def host_ms_per_target_pass(self) -> float:
        return 1000 * self.host_s / max(1, self.target_calls)

    @classmethod
    def from_record(cls, record: dict) -> HostCost:
        """The same split for a run's record: its wall time, and the passes the runner's hooks timed (target,
        draft and self-draft)."""
        forward = sum(record.get("target_pass_s") or []) + sum(record.get("draft_pass_s") or [])
        return cls(record["wall_s"], forward, record["target_calls"], record["new_tokens"])


def measure_host_cost(method: Method, target: torch.nn.Module, draft: torch.nn.Module | None,
                      prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                      eos_token_ids: frozenset[int] = frozenset(), state: dict | None = None,
                      corpus: list[str] | None = None, tokenizer=None) -> HostCost:
    """One generation under fresh pass counters (removed afterwards)."""
    counters = [PassCounter(target, "target"), PassCounter(target, "self-draft", self_draft=True)]
    if draft is not None:
        counters.append(PassCounter(draft, "draft"))
    try:
        ctx = DecodeContext(prompt_ids=list(prompt_ids), target=target, draft=draft, sampling=sampling,
                            max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids, tokenizer=tokenizer,
                            state=state if state is not None else {}, corpus=list(corpus or []))
        synchronize(target)
        start = time.perf_counter()
        method.generate(ctx)
        synchronize(target)
        wall = time.perf_counter() - start
        forward = sum(sum(c.pass_seconds()) for c in counters)
        return HostCost(wall, forward, counters[0].calls, len(ctx.output))
    finally:
        for counter in counters:
            counter.remove()
