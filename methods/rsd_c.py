"""Recursive Speculative Decoding with constant branching factors: Gumbel-Top-k siblings, verified recursively."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from methods.base import DecodeContext, Method, Needs, Paper, register
from methods.common.sampling import gumbel_top_k
from methods.common.tree import DraftTree
from methods.common.tree_method import parse_widths, run_tree_method

RSD_PAPER = Paper(
    "Recursive Speculative Decoding: Accelerating LLM Inference via Sampling Without Replacement",
    arxiv="2402.14160",
)


@register("rsd_c")
class RecursiveSpeculativeDecodingConstant(Method):
    paper = RSD_PAPER
    needs = Needs(draft=True)
    lossless = True

    @dataclass
    class Config:
        # branching factor of every node at each level; the paper sweeps several per budget and fixes
        # none, so this default (depth 5 like sps's gamma, 2 x 2 leaves) is ours
        branching: str = "2,2,1,1,1"

        def __post_init__(self):
            parse_widths(self.branching, "rsd_c.branching")

    def generate(self, ctx: DecodeContext) -> list[int]:
        return run_tree_method(ctx, partial(self.draft_tree, ctx))

    def draft_tree(self, ctx: DecodeContext, drafter, depth: int) -> DraftTree:
        widths = parse_widths(self.config.branching, "rsd_c.branching")
        generator = None if ctx.sampling.greedy else ctx.generator
        tree = DraftTree(replacement=False)

        def choose(node, q, width):
            if generator is not None:
                tree.set_dist(node, q)
            # distinct siblings without replacement, in draw order (greedy: the top-k)
            return gumbel_top_k(q.log(), width, generator)

        drafter.grow_levels(tree, widths[:depth], choose)
        return tree
