"""Recursive Speculative Decoding with Stochastic Beam Search drafting: draft sequences sampled
without replacement, the unlikely ones truncated early, verified recursively."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from methods.base import DecodeContext, Method, Needs, register
from methods.common.tree import ROOT, DraftTree
from methods.common.tree_method import run_tree_method
from methods.rsd_c import RSD_PAPER


def conditioned_gumbels(parent_value: float, phis: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Perturbed log-probabilities of a node's children whose maximum equals the parent's perturbed
    value (Kool et al., arXiv 1903.06059, eq. 10, in its numerically stable form)."""
    gumbel = phis - (-torch.rand(phis.shape, generator=generator).clamp(1e-20, 1 - 1e-7).log()).log()
    top = gumbel.max()
    v = parent_value - gumbel + torch.log1p(-torch.exp((gumbel - top).clamp(max=-1e-12)))
    return parent_value - v.clamp_min(0) - torch.log1p(torch.exp(-v.abs()))


@register("rsd_s")
class RecursiveSpeculativeDecodingBeam(Method):
    paper = RSD_PAPER
    needs = Needs(draft=True)
    lossless = True

    @dataclass
    class Config:
        # the paper sweeps (beamwidth, draft length) per budget and fixes none: ours, depth as sps's gamma
        beam_width: int = 3
        depth: int = 5

        def __post_init__(self):
            if self.beam_width < 1 or self.depth < 1:
                raise ValueError("rsd_s.beam_width and rsd_s.depth must be positive")

    def generate(self, ctx: DecodeContext) -> list[int]:
        return run_tree_method(ctx, partial(self.draft_tree, ctx))

    def draft_tree(self, ctx: DecodeContext, drafter, depth: int) -> DraftTree:
        greedy = ctx.sampling.greedy
        tree = DraftTree(replacement=False)
        width, depth = self.config.beam_width, min(depth, self.config.depth)
        beams = [(ROOT, 0.0, 0.0)]  # (node, perturbed log-prob G, log-prob phi of the sequence)
        rows = drafter.start(tree)[None]
        for level in range(depth):
            candidates = []  # (G, phi, parent, token)
            for (node, value, phi), logits in zip(beams, rows):
                q = drafter.dist(logits)
                if not greedy:
                    tree.set_dist(node, q)
                phis = phi + q.log()
                # greedy: plain beam search on log-probabilities (no noise)
                keys = phis if greedy else conditioned_gumbels(value, phis, ctx.generator)
                top = torch.topk(keys, min(width, int(torch.isfinite(keys).sum())))
                for key, token in zip(top.values.tolist(), top.indices.tolist()):
                    candidates.append((key, float(phis[token]), node, token))
            # the W best sequences survive (sequences sampled without replacement); a node's
            # children enter in descending perturbed value = their Gumbel-Top-k draw order
            candidates.sort(key=lambda c: c[0], reverse=True)
            beams = [(tree.add(parent, token), key, phi)
                     for key, phi, parent, token in candidates[:width] if math.isfinite(key)]
            if level + 1 < depth:
                rows = drafter.expand(tree, [node for node, _, _ in beams])
        return tree
