"""SpecInfer's token tree from one draft model: a fixed expansion per level, verified in one target pass."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from methods.base import DecodeContext, Method, Needs, Paper, register
from methods.common.sampling import sample
from methods.common.tree import DraftTree
from methods.common.tree_method import parse_widths, run_tree_method


@register("specinfer_tree")
class SpecInferTree(Method):
    paper = Paper(
        "SpecInfer: Accelerating Large Language Model Serving with Tree-based Speculative Inference and Verification",
        arxiv="2305.09781",
    )
    needs = Needs(draft=True)
    lossless = True

    @dataclass
    class Config:
        # children per node at each level: the paper's expansion config <1,1,3,1,1,1,1,1> (8 levels, 3 leaves)
        expansion: str = "1,1,3,1,1,1,1,1"

        def __post_init__(self):
            parse_widths(self.expansion, "specinfer_tree.expansion")

    def generate(self, ctx: DecodeContext) -> list[int]:
        return run_tree_method(ctx, partial(self.draft_tree, ctx))

    def draft_tree(self, ctx: DecodeContext, drafter, depth: int) -> DraftTree:
        widths = parse_widths(self.config.expansion, "specinfer_tree.expansion")
        tree = DraftTree(replacement=True)

        def choose(node, q, width):
            if ctx.sampling.greedy:  # the draft's top-k; the greedy rule needs no draft distribution
                return q.topk(width).indices.tolist()
            # sampled i.i.d. from q (the multi-step speculative sampling rule assumes it); a
            # repeated token is merged into one node and tried again by the rule
            tree.set_dist(node, q)
            return [sample(q, ctx.generator) for _ in range(width)]

        drafter.grow_levels(tree, widths[:depth], choose)
        return tree
