"""The target's side of draft-then-verify, shared by every method that drafts a token chain."""
from __future__ import annotations

import torch

from methods.base import DecodeContext
from methods.common.kv import crop, extend, new_cache
from methods.common.sampling import next_token
from methods.common.verify import verify


class ChainVerifier:
    """Holds the target's KV cache and the last emitted token, which the cache has not seen yet.

    Each `step` runs ONE target pass over [pending token] + drafts, accepts a prefix by the
    verification rule of `ctx.sampling`, emits it with the correction/bonus token, and crops the
    cache to the accepted prefix.
    """

    def __init__(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        self.cache = new_cache(ctx.target)
        logits = extend(ctx.target, ctx.prompt_ids, self.cache, last_only=True)[-1]
        self.pending = next_token(logits, ctx.sampling, ctx.generator)
        ctx.emit([self.pending])

    def room(self, wanted: int) -> int:
        """Draft tokens worth proposing: the correction/bonus token always adds one more."""
        return max(0, min(wanted, self.ctx.max_new_tokens - len(self.ctx.output) - 1))

    def step(self, drafts: list[int], draft_probs: torch.Tensor | None = None) -> int:
        """Verify `drafts` (with the distributions they were sampled from, if sampled); return how many were accepted."""
        ctx = self.ctx
        base = self.cache.get_seq_length()
        logits = extend(ctx.target, [self.pending] + drafts, self.cache)
        accepted, correction = verify(drafts, draft_probs, logits, ctx.sampling, ctx.generator)
        ctx.emit(drafts[:accepted] + [correction], proposed=len(drafts))
        crop(self.cache, base + 1 + accepted)
        self.pending = correction
        return accepted
