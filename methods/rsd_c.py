"""Recursive Speculative Decoding with constant branching factors: siblings drawn without replacement
(Gumbel-Top-k), verified recursively."""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import DecodeContext, Paper, Settings, register, setting
from methods.common.tree import DraftTree, TreeDrafter
from methods.common.tree_method import TreeMethod

RSD_PAPER = Paper(
    "Recursive Speculative Decoding: Accelerating LLM Inference via Sampling Without Replacement",
    arxiv="2402.14160",
)


@register("rsd_c")
class RecursiveSpeculativeDecodingConstant(TreeMethod):
    paper = RSD_PAPER

    @dataclass
    class Config(Settings):
        # the paper sweeps several per budget and fixes none: this default (depth 5 like sps's gamma,
        # 2 x 2 leaves) is ours
        branching: tuple[int, ...] = setting((2, 2, 1, 1, 1), "children of every node at each level", low=1)

    def draft_tree(self, ctx: DecodeContext, drafter: TreeDrafter, depth: int) -> DraftTree:
        # sampling: distinct siblings drawn without replacement, in draw order (Gumbel-Top-k); greedy:
        # the top-k, what Gumbel-Top-k becomes without noise
        tree = DraftTree(replacement=False)
        drafter.grow_levels(tree, self.config.branching[:depth])
        return tree
