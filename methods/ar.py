"""Autoregressive decoding with a KV cache: the baseline every speed-up is measured against."""
from __future__ import annotations

from methods.base import DecodeContext, Method, Paper, register
from methods.common.kv import extend, new_cache
from methods.common.sampling import next_token


@register("ar")
class Autoregressive(Method):
    paper = Paper("Autoregressive decoding with a KV cache (baseline)")
    lossless = True

    def generate(self, ctx: DecodeContext) -> list[int]:
        cache = new_cache(ctx.target)
        logits = extend(ctx.target, ctx.prompt_ids, cache, keep=1)[-1]
        while True:
            token = next_token(logits, ctx.sampling, ctx.generator)
            ctx.emit([token])
            if ctx.done:
                return ctx.output
            logits = extend(ctx.target, [token], cache)[-1]
