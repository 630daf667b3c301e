"""SpecInfer's token tree from one draft model: a fixed expansion per level, verified in one target pass."""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import DecodeContext, Paper, Settings, register, setting
from methods.common.tree import DraftTree, TreeDrafter
from methods.common.tree_method import TreeMethod


@register("specinfer_tree")
class SpecInferTree(TreeMethod):
    paper = Paper(
        "SpecInfer: Accelerating Large Language Model Serving with Tree-based Speculative Inference and Verification",
        arxiv="2305.09781",
    )

    @dataclass
    class Config(Settings):
        expansion: tuple[int, ...] = setting(
            (1, 1, 3, 1, 1, 1, 1, 1), "children per node at each level (the paper's <1,1,3,1,1,1,1,1>)", low=1)

    def draft_tree(self, ctx: DecodeContext, drafter: TreeDrafter, depth: int) -> DraftTree:
        # greedy: the draft's top-k per node; sampling: siblings drawn i.i.d. from q (the multi-step
        # speculative sampling rule assumes it), a repeated token merged into one node and tried again
        tree = DraftTree(replacement=True)
        drafter.grow_levels(tree, self.config.expansion[:depth])
        return tree
