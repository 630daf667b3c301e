"""The target's side of draft-then-verify, shared by every method that drafts a token chain."""
from __future__ import annotations

import torch

from methods.base import DecodeContext
from methods.common.kv import crop, extend, new_cache
from methods.common.verify import verify


class ChainVerifier:
    """Holds the target's KV cache and the tokens it has not seen yet: the prompt at first (so the
    prompt is prefilled in the same pass that verifies the first drafts, as Leviathan et al. and
    transformers do), then the last emitted token.

    Each `step` runs ONE target pass over those tokens + drafts, accepts a prefix by the
    verification rule of `ctx.sampling`, emits it with the correction/bonus token, and crops the
    cache to the accepted prefix.
    """

    def __init__(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        self.cache = new_cache(ctx.target)
        self.unseen = list(ctx.prompt_ids)

    @property
    def pending(self) -> int:
        """The last emitted token (the target's cache has not processed it yet)."""
        return self.unseen[-1]

    def room(self, wanted: int) -> int:
        """Draft tokens worth proposing: the correction/bonus token always adds one more."""
        return max(0, min(wanted, self.ctx.max_new_tokens - len(self.ctx.output) - 1))

    def step(self, drafts: list[int], draft_probs: torch.Tensor | None = None) -> int:
        """Verify `drafts` (with the distributions they were sampled from, if sampled); return how many were accepted."""
        ctx = self.ctx
        base = self.cache.get_seq_length()
        logits = extend(ctx.target, self.unseen + drafts, self.cache, keep=len(drafts) + 1)
        accepted, correction = verify(drafts, draft_probs, logits, ctx.sampling, ctx.generator)
        ctx.emit(drafts[:accepted] + [correction], proposed=len(drafts))
        crop(self.cache, base + len(self.unseen) + accepted)
        self.unseen = [correction]
        return accepted
