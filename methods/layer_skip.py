"""Unified Layer Skipping as a self-speculative drafter.

The paper picks the number of layers to run from a target speed-up ratio alone (layers / ratio) and
skips the rest evenly across the intermediate layers, the same for every input. In the paper the
skipping model IS the final model and is fine-tuned with that pattern (lossy without training). Here it
is training-free and lossless: the unmodified target with the paper's uniform pattern drafts a chain,
and the full target verifies it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from methods.base import DecodeContext, Paper, Settings, register, setting
from methods.common.layerskip import SkipSet, decoder_layers, draft_chain
from methods.common.speculation import Chain, ChainDrafter


@lru_cache(maxsize=64)
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
class UnifiedLayerSkipping(ChainDrafter):
    paper = Paper("Accelerating Inference in Large Language Models with a Unified Layer Skipping Strategy",
                  arxiv="2404.06954")
    lossless = True

    @dataclass
    class Config(Settings):
        speedup: float = setting(2.0, "the paper's target speed-up ratio: layers run = layers / speedup", low=1.0)
        draft_tokens: int = setting(5, "chain length per step: ours (the paper does not speculate), sps's gamma",
                                    low=1)

    def propose(self, ctx: DecodeContext, chain: Chain, room: int):
        if not chain.prefilled:  # prefill alone first: the draft reuses the prompt's keys and values
            return [], None
        skip = uniform_skip_set(len(decoder_layers(ctx.target)), self.config.speedup)
        drafts, rows, _ = draft_chain(ctx, chain.verifier.cache, chain.verifier.pending, skip,
                                      min(self.config.draft_tokens, room))
        return drafts, (torch.stack(rows) if rows else None)
