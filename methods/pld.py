"""Prompt lookup decoding: draft by copying what followed the current n-gram earlier in the context."""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import DecodeContext, Method, Paper, register
from methods.common.ngram import lookup_continuation
from methods.common.speculation import ChainVerifier


@register("pld")
class PromptLookupDecoding(Method):
    paper = Paper("Prompt Lookup Decoding", url="https://github.com/apoorvumang/prompt-lookup-decoding")
    lossless = True

    @dataclass
    class Config:
        max_ngram_size: int = 3  # the reference implementation's defaults
        num_pred_tokens: int = 10

    def generate(self, ctx: DecodeContext) -> list[int]:
        verifier = ChainVerifier(ctx)
        while not ctx.done:
            context = ctx.prompt_ids + ctx.output
            drafts = lookup_continuation(
                context, self.config.max_ngram_size, 1, verifier.room(self.config.num_pred_tokens)
            ) if verifier.room(1) else []
            # a copied draft is deterministic: q is one-hot, so stochastic verification stays exact
            verifier.step(drafts)
        return ctx.output
