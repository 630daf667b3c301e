"""Prompts sized in tokens of the model under test: how a one-turn prompt is rendered and counted, and the
search that fills a context up to a token length.

The fill measures the real prompt with the tokenizer, but starts from an additive estimate (each piece of
the context counted once, cached), calibrated by every measurement: a 32k prompt needs 2-4 tokenizations,
not the ~15 of a blind binary search.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from methods.base import SettingError

_SENTINEL = "\u2063USER\u2063"  # never in a chat template; marks where the user text goes
_ANCHOR = "."  # counted before a piece, so a piece is counted as it tokenizes after other text


class PromptFormat:
    """A one-turn prompt as the model reads it: the tokenizer's chat template around the user text (when it
    has one and `chat`), else the text alone (with the tokenizer's own BOS), then the answer prefix as the
    start of the reply."""

    def __init__(self, tokenizer: Any, chat: bool = True) -> None:
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None) if chat else None
        self.special = not template  # plain text: let the tokenizer add its BOS, as a base model expects
        self.head, self.tail = "", "\n"
        self.counts: dict[str, int] = {}
        if template:
            probe = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                                  add_generation_prompt=True)
            if probe.count(_SENTINEL) != 1:
                raise SettingError("the tokenizer's chat template changes the user text; use chat=false")
            self.head, self.tail = probe.split(_SENTINEL)
        self.anchor = len(self.tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"])

    def text(self, user: str, answer_prefix: str = "") -> str:
        return self.head + user + self.tail + answer_prefix

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.special)["input_ids"]

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def token_indices(self, text: str, char_indices: Sequence[int]) -> list[int]:
        """For each character index of a rendered prompt, the index of the token that holds it."""
        try:
            offsets = self.tokenizer(text, add_special_tokens=self.special, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer: count the text before each
            return [self.count(text[:i]) for i in char_indices]
        ends = [end for _, end in offsets]
        return [bisect.bisect_right(ends, i) for i in char_indices]

    def piece_counts(self, pieces: Sequence[str]) -> list[int]:
        """Tokens each piece adds when it follows other text (cached; one batched call for the new ones)."""
        new = sorted({p for p in pieces if p not in self.counts})
        if new:
            batch = self.tokenizer([_ANCHOR + p for p in new], add_special_tokens=False)["input_ids"]
            self.counts.update({p: max(len(ids) - self.anchor, 0) for p, ids in zip(new, batch)})
        return [self.counts[p] for p in pieces]


@dataclass
class Fit:
    n: int  # haystack units used
    text: str  # the rendered prompt
    tokens: int  # its measured length


def largest_within(estimate: Callable[[int], float], budget: float, n_max: int) -> int:
    """The largest n in [0, n_max] with estimate(n) <= budget (estimate non-decreasing in n)."""
    lo, hi = 0, n_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit(build: Callable[[int], str], estimate: Callable[[int], float], n_max: int, target: int,
        count: Callable[[str], int], what: str, tolerance: int = 2, rounds: int = 10) -> Fit:
    """The prompt `build(n)` with the most units n whose measured length is at most `target` tokens, stopping
    as soon as it is within `tolerance` tokens of it. `estimate(n)` predicts the length of build(n) up to a
    constant and a scale, both taken from the measurements."""
    empty = build(0)
    fixed = count(empty)
    if fixed > target:
        raise SettingError(f"lengths: {target} tokens is too short for {what} (its prompt without any context takes {fixed})")
    best = Fit(0, empty, fixed)
    base, scale = estimate(0), 1.0
    tried = {0}
    n = largest_within(estimate, base + (target - fixed) / scale, n_max)
    for _ in range(rounds):
        if n in tried:
            break
        tried.add(n)
        text = build(n)
        tokens = count(text)
        if tokens <= target and tokens >= best.tokens:
            best = Fit(n, text, tokens)
        if 0 <= target - tokens <= tolerance:
            break
        grown = estimate(n) - base
        if grown > 0 and tokens > fixed:
            scale = (tokens - fixed) / grown
        nxt = largest_within(estimate, base + (target - fixed) / scale, n_max)
        if nxt == n:  # the estimate cannot tell: step one unit toward the target
            nxt = n + 1 if tokens < target else n - 1
        n = min(max(nxt, 0), n_max)
    return best  # short of the target only when n_max units are too few (the caller grows them)
