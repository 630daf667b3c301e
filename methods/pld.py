"""Prompt lookup decoding: draft by copying what followed the current n-gram earlier in the context."""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import DecodeContext, Paper, Settings, register, setting
from methods.common.ngram import lookup_continuation
from methods.common.speculation import Chain, ChainDrafter


@register("pld")
class PromptLookupDecoding(ChainDrafter):
    paper = Paper("Prompt Lookup Decoding", url="https://github.com/apoorvumang/prompt-lookup-decoding")
    lossless = True

    @dataclass
    class Config(Settings):  # the reference implementation's defaults
        max_ngram_size: int = setting(3, "longest suffix n-gram looked up in the context", low=1)
        num_pred_tokens: int = setting(10, "tokens copied after the match (draft length)", low=1)

    def propose(self, ctx: DecodeContext, chain: Chain, room: int):
        # a copied draft is deterministic: q is one-hot, so stochastic verification stays exact
        cfg = self.config
        return lookup_continuation(chain.tokens, cfg.max_ngram_size, 1, min(cfg.num_pred_tokens, room)), None
