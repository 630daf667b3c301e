"""Speculative sampling: a small draft model proposes gamma tokens, the target verifies them in one pass."""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import DecodeContext, Needs, Paper, Settings, register, setting
from methods.common.speculation import Chain, ChainDrafter


@register("sps")
class SpeculativeSampling(ChainDrafter):
    # Same algorithm in Chen et al., "Accelerating LLM Decoding with Speculative Sampling", arXiv 2302.01318.
    paper = Paper("Fast Inference from Transformers via Speculative Decoding", arxiv="2211.17192")
    needs = Needs(draft=True)
    lossless = True

    @dataclass
    class Config(Settings):
        gamma: int = setting(5, "draft tokens per step", low=1)

    def propose(self, ctx: DecodeContext, chain: Chain, room: int):
        """gamma tokens from the draft model, sampled from its warped distribution (greedy: its argmax)."""
        drafts, probs, _ = chain.draft.chain(ctx, chain.tokens, min(self.config.gamma, room), not ctx.sampling.greedy)
        return drafts, probs
