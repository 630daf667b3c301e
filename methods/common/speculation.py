"""Draft a token chain, verify it in one target pass: the family's loop, written once.

- `ChainVerifier(ctx)`: the target's side (its KV cache, the tokens it has not seen, one verification
  pass per step).
- `DraftCache(ctx)`: a draft model's KV cache that follows the verified tokens.
- `ChainDrafter`: the base of every chain drafter (sps, pld, layer_skip...). A subclass implements only
  `propose`; room, verification and the draft cache's follow-up are done here.
"""
from __future__ import annotations

import torch

from methods.base import DecodeContext, Method
from methods.common.kv import crop, extend, new_cache
from methods.common.sampling import argmax, on_target_vocab, sample, warp
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
        logits = extend(ctx.target, self.unseen + drafts, self.cache, keep=len(drafts) + 1)
        accepted, correction = verify(drafts, draft_probs, logits, ctx.sampling, ctx.generator)
        ctx.emit(drafts[:accepted] + [correction], proposed=len(drafts))
        # drop the rejected drafts counted from the end: a cache policy may have evicted older entries
        crop(self.cache, self.cache.get_seq_length() - (len(drafts) - accepted))
        self.unseen = [correction]
        return accepted


class DraftCache:
    """A draft model's KV cache kept in step with the verified tokens. `sync(tokens)` keeps the longest
    prefix the cache shares with `tokens` (the verified context), feeds the rest and returns the
    next-token logits; `feed(token)` appends one draft token. So a rejected draft costs a crop, an
    accepted one nothing: no per-method bookkeeping of what the draft has seen."""

    def __init__(self, ctx: DecodeContext) -> None:
        if ctx.draft is None:
            raise ValueError("this method needs a draft model (--draft)")
        self.model = ctx.draft
        self.vocab = ctx.target.config.vocab_size
        self.cache = new_cache(ctx.draft)
        self.tokens: list[int] = []  # what the cache holds
        self.verified = 0  # tokens[:verified] were verified context at the last sync: they never change

    def sync(self, context: list[int]) -> torch.Tensor:
        """Logits (target vocabulary) of the token after `context`, which extends the last synced context."""
        common, limit = self.verified, min(len(self.tokens), len(context))
        while common < limit and self.tokens[common] == context[common]:
            common += 1
        common = min(common, len(context) - 1)  # at least one token fed: its logits are the answer
        crop(self.cache, common)
        del self.tokens[common:]
        self.verified = len(context)
        return self.feed(context[common:])

    def feed(self, tokens: list[int]) -> torch.Tensor:
        self.tokens += tokens
        return on_target_vocab(extend(self.model, tokens, self.cache, keep=1)[-1], self.vocab)

    def chain(self, ctx: DecodeContext, context: list[int], k: int, sampled: bool
              ) -> tuple[list[int], torch.Tensor | None, torch.Tensor]:
        """`k` tokens after `context`, one draft pass each: the argmax, or (`sampled`) drawn from the warped
        distribution. Returns the drafts, the distributions they were drawn from (k x V; None when not
        sampled) and the first position's logits. The last draft is not fed (the target verifies it)."""
        first = logits = self.sync(context)
        drafts: list[int] = []
        probs = torch.empty(k, self.vocab, device=logits.device) if sampled else None
        for i in range(k):
            if sampled:
                probs[i] = warp(logits, ctx.sampling)
                drafts.append(sample(probs[i], ctx.generator))
            else:
                drafts.append(argmax(logits))
            if i < k - 1:
                logits = self.feed(drafts[-1:])
        return drafts, probs, first


class ChainDrafter(Method):
    """Draft-then-verify with one token chain per step. A subclass implements `propose` only; the loop
    here asks for at most `room` drafts (the correction/bonus token takes the last place before
    max_new_tokens), verifies them in one target pass and keeps the draft model's cache (`self.draft`
    of the chain, when there is a draft model) in step with what was accepted."""

    def propose(self, ctx: DecodeContext, chain: Chain, room: int) -> tuple[list[int], torch.Tensor | None]:
        """At most `room` (>= 1) draft tokens to follow `chain.tokens`, and under sampling the distributions
        (rows over the target vocabulary) they were drawn from; None for deterministic drafts (a point
        mass on each: copied or argmax tokens)."""
        raise NotImplementedError

    def generate(self, ctx: DecodeContext) -> list[int]:
        chain = Chain(ctx)
        while not ctx.done:
            room = chain.verifier.room(ctx.max_new_tokens)
            # room 0: only the final token is left, the target emits it alone
            drafts, dists = self.propose(ctx, chain, room) if room else ([], None)
            if len(drafts) > room:
                raise RuntimeError(f"{self.name} proposed {len(drafts)} drafts where {room} fit")
            chain.verifier.step(drafts, None if ctx.sampling.greedy else dists)
        return ctx.output


class Chain:
    """What a proposer drafts from in one generation: the verified tokens, the target's side (its cache
    and pending token, which a self-drafter drafts on) and the draft model's cache (None without one)."""

    def __init__(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        self.verifier = ChainVerifier(ctx)
        self.draft = DraftCache(ctx) if ctx.draft is not None else None

    @property
    def tokens(self) -> list[int]:
        """The verified context: prompt and output so far."""
        return self.ctx.prompt_ids + self.ctx.output

    @property
    def prefilled(self) -> bool:
        """Whether the target's cache holds the prompt yet (a self-drafter drafts on its keys and values)."""
        return self.verifier.cache.get_seq_length() > 0
