"""Counting what methods make the models do, and stopping them when a budget runs out.

Hooks sit on the model module itself, so every path into `forward` (our methods,
transformers' generate, assisted generation's draft) is counted: no method can
under-report its cost. Hooks on the model's parts (input embedding, every decoder layer
with its attention and MLP, LM head) catch the other paths: a part called outside a
counted pass is uncounted work, recorded, and an error under strict counting.
"""
from __future__ import annotations

import sys
import time
import weakref
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from methods.base import BudgetExhausted
from methods.common.cache_policy import attached
from methods.common.kv import kv_bytes
from methods.common.layerskip import is_self_drafting, is_skipped


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


class UncountedWork(RuntimeError):
    """Under strict counting: model work outside a counted pass, or a pass marked as self-drafting that
    skipped no sublayer."""


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class ModelWatch:
    """Hooks on a model's parts, shared by every PassCounter on the model (one set per model).

    Parts: the input embedding, every decoder layer and its `self_attn` and `mlp`, the LM head. Called
    outside any top-level pass, a part's hook adds to the uncounted-work count (an UncountedWork error
    under strict counting). Within a self-draft pass it adds one to the part's count, and from those
    counts and which parts were skipped (`methods.common.layerskip`) `pass_bytes` gives the parameter
    bytes the pass ran. Per call: a flag check and an integer add. Within any other pass the part hooks
    are taken off (the top-level hooks put them back after it): a hooked module takes torch's slow call
    path, a few microseconds a call, and there every part call is the pass's own, counted work."""

    _watches: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @classmethod
    def attach(cls, model: torch.nn.Module) -> ModelWatch:
        watch = cls._watches.get(model)
        if watch is None:
            watch = cls._watches[model] = cls(model)
        watch.users += 1
        return watch

    def detach(self, model: torch.nn.Module) -> None:
        self.users -= 1
        if self.users <= 0:
            self._arm()  # so that removing finds every hook in its place
            for handle in self._handles:
                handle.remove()
            self._watches.pop(model, None)

    def __init__(self, model: torch.nn.Module) -> None:
        self.users = 0
        self.strict = False
        self.depth = 0  # top-level passes under way (0: a part called now is uncounted work)
        base = getattr(model, "model", None)
        layers = list(getattr(base, "layers", None) or [])
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = {id(m): name for name, m in model.named_modules()}
        parts: list[torch.nn.Module] = [m for m in (embed,) if isinstance(m, torch.nn.Module)]
        for layer in layers:
            parts.append(layer)
            parts += [m for m in (getattr(layer, "self_attn", None), getattr(layer, "mlp", None))
                      if isinstance(m, torch.nn.Module)]
        self.head = None
        if isinstance(head, torch.nn.Module):
            self.head = len(parts)
            parts.append(head)
        self.parts = parts
        self.names = [names.get(id(m), type(m).__name__) for m in parts]
        # bytes each part runs itself: a layer's own (its norms), then its attention and MLP apart
        self.bytes = [_param_bytes(m) for m in parts]
        for i, m in enumerate(parts):
            if m in layers:
                self.bytes[i] -= sum(_param_bytes(sub) for sub in (getattr(m, "self_attn", None), getattr(m, "mlp", None))
                                     if isinstance(sub, torch.nn.Module))
        self.priced = [i for i, m in enumerate(parts) if m is not embed]  # embedding row reads aside
        norm = getattr(base, "norm", None)
        self.norm_bytes = _param_bytes(norm) if isinstance(norm, torch.nn.Module) else 0
        # a full pass: every layer, attention and MLP, the final norm and the head
        self.full_bytes = sum(self.bytes[i] for i in self.priced) + self.norm_bytes
        self.calls = [0] * len(parts)  # per part, in the current (or last) top-level pass
        self.stray = [0] * len(parts)  # per part, outside any top-level pass since `reset`
        self._zeros = [0] * len(parts)
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._leave, always_call=True)]
        self._part_hooks = []  # (hook dict, id, hook): taken off and put back per pass
        for i, part in enumerate(parts):
            handle = part.register_forward_pre_hook(self._part_hook(i))
            self._handles.append(handle)
            self._part_hooks.append((part._forward_pre_hooks, handle.id, part._forward_pre_hooks[handle.id]))
        self.armed = True

    def reset(self) -> None:
        self.depth = 0
        self.calls[:] = self._zeros
        self.stray[:] = self._zeros
        self._arm()  # a pass interrupted by a KeyboardInterrupt ran no always-call hook

    def _arm(self) -> None:
        if not self.armed:
            for hooks, key, hook in self._part_hooks:
                hooks[key] = hook
            self.armed = True

    def _disarm(self) -> None:
        for hooks, key, _ in self._part_hooks:
            hooks.pop(key, None)
        self.armed = False

    def _enter(self, module, args) -> None:
        self.depth += 1
        if self.depth == 1:
            if is_self_drafting(module):
                self.calls[:] = self._zeros
            else:
                self._disarm()

    def _leave(self, module, args, output) -> None:
        self.depth = max(0, self.depth - 1)
        if not self.depth:
            self._arm()

    def _part_hook(self, i: int):
        calls = self.calls

        def hook(module, args):
            if self.depth:
                calls[i] += 1
            else:
                self._uncounted(i)
        return hook

    def _uncounted(self, i: int) -> None:
        self.stray[i] += 1
        if self.strict:
            raise UncountedWork(f"{self.names[i]} was called outside a forward pass of the model: work no "
                                f"counter sees (strict counting)")

    def uncounted(self, prefix: str = "") -> tuple[int, str | None]:
        """Part calls outside any counted pass since `reset`, and which parts (e.g. 'lm_head x3')."""
        note = ", ".join(f"{prefix}{self.names[i]} x{n}" for i, n in enumerate(self.stray) if n)
        return sum(self.stray), note or None

    def pass_bytes(self) -> int:
        """Parameter bytes the current (or last) self-draft pass ran: the decoder parts whose hooks fired
        and were not skipped, plus the final norm and the head when the head ran."""
        calls, parts, sizes = self.calls, self.parts, self.bytes
        ran = sum(sizes[i] for i in self.priced if calls[i] and not is_skipped(parts[i]))
        if self.head is not None and calls[self.head]:
            ran += self.norm_bytes
        return ran


class PassCounter:
    """Forward passes and tokens processed by one model, with optional budget enforcement.

    `self_draft` picks which passes of the module it counts: those marked as self-drafting (run inside
    `methods.common.layerskip.skipping`) or all the others. Two counters on the target, one of each
    kind, split its passes into draft and target passes. A self-draft counter also keeps the parameter
    bytes each of its passes ran (`pass_bytes`, measured by the part hooks) and counts passes that were
    marked as drafting yet skipped nothing (`unskipped`). `strict` makes uncounted work and such passes
    errors (UncountedWork) on this model."""

    def __init__(self, model: torch.nn.Module, role: str, self_draft: bool = False, strict: bool = False) -> None:
        self.model, self.role, self.self_draft = model, role, self_draft
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.budget = Budget()
        self.deadline: float | None = None
        self.watch = ModelWatch.attach(model)  # its hooks go first: a pass is under way before budgets are checked
        if strict:
            self.watch.strict = True
        self.reset()
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]

    def reset(self, budget: Budget | None = None, prompt_tokens: int = 0) -> None:
        """`prompt_tokens`: the prompt's length; the prefill lasts until the passes have read that many
        tokens (several passes when a cache policy prefills in chunks, one otherwise)."""
        self.calls = self.tokens = 0
        self.prompt_tokens = prompt_tokens
        self.prefill_calls = 0  # passes up to and including the one that finished reading the prompt
        self.widths: list[int] = []  # tokens per pass: verification width for a target
        self._marks: list[tuple] = []  # (start, end) per pass: CUDA events on a GPU (no sync), else perf_counter
        self.first_pass_end: float | None = None
        self.pass_bytes: list[int] = []  # self-draft passes: parameter bytes each ran
        self.unskipped = 0  # self-draft passes that skipped no sublayer
        self.budget = budget or Budget()
        self.deadline = time.perf_counter() + self.budget.max_wall_s if self.budget.max_wall_s else None
        self.watch.reset()

    @property
    def full_pass_bytes(self) -> int:
        """Parameter bytes of a full pass of the model (decoder layers, final norm, head; no embedding)."""
        return self.watch.full_bytes

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
        if self.first_pass_end is None and self.tokens >= self.prompt_tokens:
            synchronize(self.model)
            self.first_pass_end = time.perf_counter()
            self.prefill_calls = self.calls
        if self.self_draft:
            self._check_draft()

    def _check_draft(self) -> None:
        """Price the self-draft pass that just ran by what it ran, and check that it skipped something."""
        ran = self.watch.pass_bytes()
        self.pass_bytes.append(ran)
        if ran >= self.watch.full_bytes:
            self.unskipped += 1
            if self.watch.strict:
                raise UncountedWork(f"a {self.role} pass was marked as drafting but ran every sublayer "
                                    f"(strict counting)")

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
        self._handles = []
        self.watch.detach(self.model)


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


class KVWatch:
    """Bytes of keys and values the model's cache holds after each top-level pass: the peak and the last.
    The harness measures them, for every method, from the cache each pass was given (a decoder's own cache,
    or a policy's pruned one); a pass without a cache (a sliding window) holds none. Apart, what an attached
    cache policy holds beside the cache (its per-generation state, the 16-bit originals of moved keys): the
    peak, walked the way method state is."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.depth = model, 0
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._leave, with_kwargs=True, always_call=True)]
        self.reset()

    def reset(self) -> None:
        self.peak: int | None = None
        self.last: int | None = None
        self.policy_peak: int | None = None
        self.depth = 0
        self._cache = None
        self._run = None

    def _enter(self, module, args) -> None:
        self.depth += 1

    def _leave(self, module, args, kwargs, output) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth:  # a nested call (a model called inside its own forward) is part of the outer pass
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if cache is None:
            return
        held = kv_bytes(cache)  # before a policy's eviction hook (attached later) prunes it: the true peak
        self.peak = held if self.peak is None else max(self.peak, held)
        self._cache = cache
        self._run = attached(self.model) or self._run
        self._policy_held()

    def _policy_held(self) -> None:
        if self._run is not None:
            held = state_bytes(self._run.state) + state_bytes(self._run.originals)
            self.policy_peak = max(self.policy_peak or 0, held)

    def finish(self) -> None:
        """After the generation: `last` = what the last pass's cache holds now (after any eviction)."""
        if self._cache is not None:
            self.last = kv_bytes(self._cache)
            self.peak = max(self.peak or 0, self.last)
        self._policy_held()  # after the last pass's eviction
        self._cache = self._run = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
