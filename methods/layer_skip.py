"""Unified Layer Skipping as a self-speculative drafter.

The paper picks the number of layers to run from a target speed-up ratio alone (layers / ratio) and
skips the rest evenly across the intermediate layers, the same for every input. In the paper the
skipping model IS the final model and is fine-tuned with that pattern (lossy without training). Here it
is training-free and lossless: the unmodified target with the paper's uniform pattern drafts a chain,
and the full target verifies it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from methods.base import DecodeContext, Method, Paper, register
from methods.common.layerskip import SkipSet, decoder_layers, draft_chain
from methods.common.speculation import ChainVerifier


def uniform_skip_set(layers: int, speedup: float) -> SkipSet:
    """Run round(layers / speedup) whole layers spread evenly from the first to the last (both kept:
    the pattern skips intermediate layers only); skip the others."""
    if speedup < 1.0:
        raise ValueError(f"layer_skip.speedup must be >= 1, got {speedup}")
    kept_count = min(layers, max(2, round(layers / speedup))) if layers > 1 else layers
    kept = set(np.round(np.linspace(0, layers - 1, kept_count)).astype(int).tolist())
    skipped = [i for i in range(layers) if i not in kept]
    return SkipSet.of(skipped, skipped)


@register("layer_skip")
class UnifiedLayerSkipping(Method):
    paper = Paper("Accelerating Inference in Large Language Models with a Unified Layer Skipping Strategy",
                  arxiv="2404.06954")
    lossless = True

    @dataclass
    class Config:
        speedup: float = 2.0  # the paper's knob, the target speed-up ratio: ours at 2x (half the layers run)
        draft_tokens: int = 5  # chain length per step: ours (the paper does not speculate), sps's gamma

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        if self.config.speedup < 1.0 or self.config.draft_tokens < 1:
            raise ValueError(f"layer_skip needs speedup >= 1 and draft_tokens >= 1, got {self.config}")

    def generate(self, ctx: DecodeContext) -> list[int]:
        layers = len(decoder_layers(ctx.target))
        skip = uniform_skip_set(layers, self.config.speedup)
        verifier = ChainVerifier(ctx)
        verifier.step([])  # prefill on its own: the draft reuses the prompt's keys and values
        while not ctx.done:
            k = verifier.room(self.config.draft_tokens)
            drafts, dists = [], None
            if k:
                drafts, dists, _ = draft_chain(ctx, verifier.cache, verifier.pending, skip, k)
            verifier.step(drafts, None if ctx.sampling.greedy else dists)
        ctx.extras["draft_layer_fraction"] = skip.fraction_run(layers)
        return ctx.output
