"""Speculative sampling: a small draft model proposes gamma tokens, the target verifies them in one pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import DecodeContext, Method, Needs, Paper, register
from methods.common.kv import crop, extend, new_cache
from methods.common.sampling import on_target_vocab, sample, warp
from methods.common.speculation import ChainVerifier


@register("sps")
class SpeculativeSampling(Method):
    # Same algorithm in Chen et al., "Accelerating LLM Decoding with Speculative Sampling", arXiv 2302.01318.
    paper = Paper("Fast Inference from Transformers via Speculative Decoding", arxiv="2211.17192")
    needs = Needs(draft=True)
    lossless = True

    @dataclass
    class Config:
        gamma: int = 5  # draft tokens per step

    def generate(self, ctx: DecodeContext) -> list[int]:
        verifier = ChainVerifier(ctx)
        draft_cache = new_cache(ctx.draft)
        unseen = list(ctx.prompt_ids)  # tokens the draft's cache has not processed yet
        while not ctx.done:
            k = verifier.room(self.config.gamma)
            if k == 0:  # only the final token is left: the target emits it alone
                verifier.step([])
                unseen.append(verifier.pending)
                continue
            seen = draft_cache.get_seq_length()
            drafts, probs = self._draft(ctx, draft_cache, unseen, k)
            accepted = verifier.step(drafts, probs)
            # the draft's cache holds unseen + drafts[:k-1]; keep only what the target accepted
            if accepted < k:
                crop(draft_cache, seen + len(unseen) + accepted)
                unseen = [verifier.pending]
            else:
                unseen = [drafts[-1], verifier.pending]
        return ctx.output

    def _draft(self, ctx: DecodeContext, cache, unseen: list[int], k: int):
        """k draft tokens, and under sampling the k distributions they were drawn from."""
        vocab = ctx.target.config.vocab_size
        logits = extend(ctx.draft, unseen, cache, keep=1)[-1]
        drafts, probs = [], []
        for i in range(k):
            if ctx.sampling.greedy:
                token = int(logits.argmax(-1))
            else:
                q = warp(on_target_vocab(logits, vocab), ctx.sampling)
                token = sample(q, ctx.generator)
                probs.append(q)
            drafts.append(token)
            if i < k - 1:
                logits = extend(ctx.draft, [token], cache)[-1]
        return drafts, (torch.stack(probs) if probs else None)
