"""Recursive Speculative Decoding with Stochastic Beam Search drafting: draft sequences sampled
without replacement, the unlikely ones truncated early, verified recursively."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.base import DecodeContext, Settings, register, setting
from methods.common.tree import ROOT, DraftTree, TreeDrafter
from methods.common.tree_method import TreeMethod
from methods.rsd_c import RSD_PAPER


def gumbel(location: float, u: float) -> float:
    return location - math.log(-math.log(u))


def top_down_gumbels(phi: float, probs: list[float], uniforms: list[float]) -> list[float]:
    """The perturbed log-probabilities phi + log q(x) + Gumbel of a node's children x_1, x_2, ... drawn
    without replacement from q in that order: they are the largest perturbed values in descending
    order, so each is a Gumbel located at the log of the mass not drawn before it, truncated below the
    previous one (the top-down construction of Maddison et al., arXiv 1411.0030), and the children
    never drawn need no noise at all."""
    values, bound, rest = [], math.inf, 1.0
    for q, u in zip(probs, uniforms):
        if rest <= 0:
            break
        g = gumbel(phi + math.log(rest), u)
        if bound < math.inf:  # -log(exp(-g) + exp(-bound)), without overflow
            g = min(g, bound) - math.log1p(math.exp(-abs(g - bound)))
        values.append(g)
        bound, rest = g, rest - q
    return values


def conditioned(parent_value: float, values: list[float]) -> list[float]:
    """Children's perturbed values shifted so their maximum equals the parent's perturbed value (Kool
    et al., arXiv 1903.06059, eq. 10, in its numerically stable form); `values[0]` is their maximum."""
    out = []
    for g in values:
        gap = min(g - values[0], -1e-12)
        v = parent_value - g + math.log1p(-math.exp(gap))
        out.append(parent_value - max(v, 0.0) - math.log1p(math.exp(-abs(v))))
    return out


@register("rsd_s")
class RecursiveSpeculativeDecodingBeam(TreeMethod):
    paper = RSD_PAPER

    @dataclass
    class Config(Settings):
        # the paper sweeps (beamwidth, draft length) per budget and fixes none: ours, depth as sps's gamma
        beam_width: int = setting(3, "beams kept per level (sequences sampled without replacement)", low=1)
        depth: int = setting(5, "draft length (levels of the tree)", low=1)

    def draft_tree(self, ctx: DecodeContext, drafter: TreeDrafter, depth: int) -> DraftTree:
        greedy = ctx.sampling.greedy
        tree = DraftTree(replacement=False)
        width, depth = self.config.beam_width, min(depth, self.config.depth)
        beams = [(ROOT, 0.0, 0.0)]  # (node, perturbed log-prob G, log-prob phi of the sequence)
        rows = drafter.start(tree)[None]
        for level in range(depth):
            candidates = []  # (G, phi, parent, token)
            if greedy:  # plain beam search on log-probabilities (no noise): each beam's top W
                tokens, logprobs = drafter.top(rows, width, logprobs=True)
                for (node, _, phi), toks, lps in zip(beams, tokens, logprobs):
                    candidates += [(phi + lp, phi + lp, node, tok) for tok, lp in zip(toks, lps)]
            else:  # stochastic beam search: each beam's W best perturbed children, drawn top-down
                q = drafter.probs(rows)
                drawn = drafter.distinct(q, width)
                uniforms = torch.rand(len(beams), width, dtype=torch.float64, generator=ctx.generator)
                for (node, value, phi), dist, toks, probs, us in zip(
                        beams, q, drawn, drafter.at(q, drawn), uniforms.clamp(1e-300, 1 - 2**-53).tolist()):
                    tree.set_dist(node, dist)
                    keys = conditioned(value, top_down_gumbels(phi, probs, us))
                    candidates += [(key, phi + math.log(p), node, tok) for key, p, tok in zip(keys, probs, toks)]
            # the W best sequences survive (sequences sampled without replacement); a node's
            # children enter in descending perturbed value = their draw order
            candidates.sort(key=lambda c: c[0], reverse=True)
            beams = [(tree.add(parent, token), key, phi)
                     for key, phi, parent, token in candidates[:width] if math.isfinite(key)]
            if level + 1 < depth:
                rows = drafter.expand(tree, [node for node, _, _ in beams])
        return tree
