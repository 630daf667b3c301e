"""Counting what methods make the models do, and stopping them when a budget runs out.

Hooks sit on the model module itself, so every path into `forward` (our methods,
transformers' generate, assisted generation's draft) is counted: no method can
under-report its cost.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from methods.base import BudgetExhausted


@dataclass(frozen=True)
class Budget:
    max_target_calls: int | None = None
    max_target_tokens: int | None = None  # tokens the target processes: a FLOP proxy
    max_wall_s: float | None = None

    @property
    def label(self) -> str:
        """'' when unlimited, else e.g. 'target_calls=32' (the key that tells sweep points apart)."""
        parts = [(n, v) for n, v in (("target_calls", self.max_target_calls), ("target_tokens", self.max_target_tokens),
                                     ("wall_s", self.max_wall_s)) if v is not None]
        return ",".join(f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}" for n, v in parts)


def _tokens_in(args: tuple, kwargs: dict) -> int:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is not None:
        return int(ids.numel())
    embeds = kwargs.get("inputs_embeds")
    return int(embeds.shape[0] * embeds.shape[1]) if embeds is not None else 0


class PassCounter:
    """Forward passes and tokens processed by one model, with optional budget enforcement."""

    def __init__(self, model: torch.nn.Module, role: str) -> None:
        self.model, self.role = model, role
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.budget = Budget()
        self.deadline: float | None = None
        self.reset()
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]

    def reset(self, budget: Budget | None = None) -> None:
        self.calls = self.tokens = 0
        self.widths: list[int] = []  # tokens per pass: verification width for a target
        self._marks: list[tuple] = []  # (start, end) per pass: CUDA events on a GPU (no sync), else perf_counter
        self.first_pass_end: float | None = None
        self.budget = budget or Budget()
        self.deadline = time.perf_counter() + self.budget.max_wall_s if self.budget.max_wall_s else None

    def _before(self, module, args, kwargs) -> None:
        n = _tokens_in(args, kwargs)
        b = self.budget
        if b.max_target_calls is not None and self.calls + 1 > b.max_target_calls:
            raise BudgetExhausted(f"{self.role} pass budget of {b.max_target_calls} reached")
        if b.max_target_tokens is not None and self.tokens + n > b.max_target_tokens:
            raise BudgetExhausted(f"{self.role} token budget of {b.max_target_tokens} reached")
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise BudgetExhausted(f"wall-clock budget of {b.max_wall_s} s reached")
        self.calls += 1
        self.tokens += n
        self.widths.append(n)
        self._marks.append((self._mark(), None))

    def _after(self, module, args, output) -> None:
        if self._marks and self._marks[-1][1] is None:
            self._marks[-1] = (self._marks[-1][0], self._mark())
        if self.first_pass_end is None:
            synchronize(self.model)
            self.first_pass_end = time.perf_counter()

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def pass_seconds(self) -> list[float]:
        """Duration of every pass since `reset` (one synchronisation, after the generation)."""
        done = [(a, b) for a, b in self._marks if b is not None]
        if self.cuda:
            synchronize(self.model)
            return [a.elapsed_time(b) / 1000 for a, b in done]
        return [b - a for a, b in done]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def synchronize(model: torch.nn.Module) -> None:
    synchronize_device(next(model.parameters()).device)


def synchronize_device(device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (no-op on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
