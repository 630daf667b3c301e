"""Autoregressive decoding with a KV cache: the baseline every speed-up is measured against."""
from __future__ import annotations

from collections.abc import Callable

import torch

from methods.base import DecodeContext, Method, Paper, register
from methods.common.kv import extend, new_cache
from methods.common.sampling import next_token


def decode_from(ctx: DecodeContext, logits: torch.Tensor, step: Callable[[int], torch.Tensor]) -> list[int]:
    """The autoregressive loop after a prefill: pick a token from `logits` (the last prompt position's), emit
    it, get the next logits from `step(token)`, until done. Methods that only change the prefill (JRT, RDSCA)
    share it with `ar`."""
    while True:
        token = next_token(logits, ctx.sampling, ctx.generator)
        ctx.emit([token])
        if ctx.done:
            return ctx.output
        logits = step(token)


@register("ar")
class Autoregressive(Method):
    paper = Paper("Autoregressive decoding with a KV cache (baseline)")
    lossless = True

    def generate(self, ctx: DecodeContext) -> list[int]:
        cache = new_cache(ctx.target)
        logits = extend(ctx.target, ctx.prompt_ids, cache, keep=1)[-1]
        return decode_from(ctx, logits, lambda token: extend(ctx.target, [token], cache)[-1])
