"""Counting what methods make the models do, and stopping them when a budget runs out.

Hooks sit on the model module itself, so every path into `forward` (our methods,
transformers' generate, assisted generation's draft) is counted: no method can
under-report its cost.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from methods.base import BudgetExhausted, is_self_drafting


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
    """Forward passes and tokens processed by one model, with optional budget enforcement.

    `self_draft` picks which passes of the module it counts: those a self-drafting method marked as
    drafting (`methods.base.self_drafting`) or all the others. Two counters on the target, one of
    each kind, split its passes into draft and target passes."""

    def __init__(self, model: torch.nn.Module, role: str, self_draft: bool = False) -> None:
        self.model, self.role, self.self_draft = model, role, self_draft
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

    def _mine(self, module) -> bool:
        return is_self_drafting(module) == self.self_draft

    def _before(self, module, args, kwargs) -> None:
        if not self._mine(module):
            return
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
        if not self._mine(module):
            return
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


def registered_state_bytes(state: dict) -> int:
    """Bytes of the structures a method registered in ctx.state; the registry dict itself is the harness's."""
    seen: set = set()
    return sum(state_bytes(value, seen) for value in state.values())


def state_bytes(obj, _seen: set | None = None) -> int:
    """Bytes held by a method's registered data structures: tensor and array storage, plus Python
    containers walked deeply (each object counted once)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        return size + sum(state_bytes(k, seen) + state_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return size + sum(state_bytes(item, seen) for item in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return size + state_bytes(vars(obj), seen)
    if hasattr(obj, "__slots__"):
        return size + sum(state_bytes(getattr(obj, name), seen) for name in obj.__slots__ if hasattr(obj, name))
    return size
