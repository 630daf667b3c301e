"""Token Recycling: draft trees from an adjacency matrix of the target's own recent top-k candidates.

Row t of the matrix holds the k tokens the target last ranked highest right after token t. Each step
builds a draft tree by breadth-first search over a fixed template from the last token (template path
[i, j] = the j-th candidate after the i-th candidate after the root), verifies it in one target pass
with tree attention, and overwrites the rows of every token the pass processed (root and tree nodes)
with that pass's top-k at their positions. The matrix starts at zeros and lives in `ctx.state`: the
harness carries it from one prompt to the next, as in the paper's evaluation ("hot start"), or resets
it per item (`--method-state fresh`), and restores it for every repeat and budget point of one item.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import DecodeContext, Needs, Paper, Settings, register, setting
from methods.common import vocab
from methods.common.tree import ROOT, DraftTree
from methods.common.tree_method import TreeMethod

# The release's default template "2.2.2": 80 nodes over 6 levels (8, 21, 25, 15, 8, 3 nodes).
TEMPLATE_2_2_2: list[tuple[int, ...]] = (
    [(i,) for i in range(8)]
    + [(0, j) for j in range(8)] + [(1, j) for j in range(4)] + [(2, j) for j in range(3)] + [(3, 0), (3, 1)]
    + [(i, 0) for i in range(4, 8)]
    + [(0, 0, j) for j in range(8)] + [(0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1)]
    + [(0, i, 0) for i in range(3, 8)] + [(1, 0, 0), (1, 0, 1), (1, 1, 0)] + [(i, 0, 0) for i in range(2, 6)]
    + [(0, 0, 0, j) for j in range(5)] + [(0, 0, 1, 0), (0, 0, 1, 1)] + [(0, 0, i, 0) for i in range(2, 5)]
    + [(0, 1, 0, 0), (0, 2, 0, 0)] + [(i, 0, 0, 0) for i in range(1, 4)]
    + [(0, 0, 0, 0, j) for j in range(3)] + [(0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0), (0, 1, 0, 0, 0),
                                             (1, 0, 0, 0, 0)]
    + [(0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0)]
)


def build_tree(matrix: torch.Tensor, root: int, template, max_depth: int) -> DraftTree:
    """The draft tree of `template` below `root`: node (p..., j) holds row[token of (p...)][j]. Repeated
    sibling tokens merge (a fresh, all-zero row proposes one token, not k copies)."""
    tree = DraftTree()
    node_of: dict[tuple[int, ...], int] = {(): ROOT}
    rows: dict[int, list[int]] = {}  # the rows this tree reads (not the whole matrix)
    for path in sorted(template, key=lambda p: (len(p), p)):  # breadth first: parents before children
        if len(path) > max_depth or path[:-1] not in node_of:
            continue
        parent = node_of[path[:-1]]
        parent_token = root if parent == ROOT else tree.tokens[parent]
        if parent_token not in rows:
            rows[parent_token] = matrix[parent_token].tolist()
        node_of[path] = tree.add(parent, rows[parent_token][path[-1]])
    return tree


def recycle(matrix: torch.Tensor, tokens: list[int], logits: torch.Tensor) -> None:
    """Overwrite row tokens[i] with the top-k of logits[i] (a token fed twice keeps its last row): one
    batched top-k, one transfer, one indexed write."""
    k, size = matrix.shape[1], matrix.shape[0]
    top = vocab.top_k(logits if logits.shape[-1] == size else logits[:, :size], k)[1]
    top = top.to(device=matrix.device, dtype=matrix.dtype)
    last = {token: i for i, token in enumerate(tokens)}
    matrix[list(last)] = top[list(last.values())]


@register("token_recycling")
class TokenRecycling(TreeMethod):
    paper = Paper("Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token Recycling",
                  arxiv="2408.08696", venue="ACL 2025")
    needs = Needs()  # no draft model: the tree comes from the matrix, which learns from every target pass
    stateful = True  # the matrix, in ctx.state["adjacency_matrix"]

    @dataclass
    class Config(Settings):
        k: int = setting(8, "candidates kept per token (the matrix's width)", low=1)

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        self.template = [p for p in TEMPLATE_2_2_2 if max(p) < self.config.k]
        self.depth = max(len(p) for p in self.template)

    def matrix(self, ctx: DecodeContext) -> torch.Tensor:
        vocab_size = ctx.target.config.vocab_size
        matrix = ctx.state.get("adjacency_matrix")
        if matrix is None or matrix.shape != (vocab_size, self.config.k):
            # int32 holds any vocabulary id at half the release's int64 footprint
            matrix = ctx.state["adjacency_matrix"] = torch.zeros(vocab_size, self.config.k, dtype=torch.int32)
        return matrix

    def draft_tree(self, ctx: DecodeContext, drafter: None, depth: int) -> DraftTree:
        return build_tree(self.matrix(ctx), ctx.output[-1] if ctx.output else ctx.prompt_ids[-1], self.template,
                          min(depth, self.depth))

    def learn(self, ctx: DecodeContext, root: int, tree: DraftTree, logits: torch.Tensor) -> None:
        # the pass's rows: the root (last committed token), then every node
        recycle(self.matrix(ctx), [root] + tree.tokens, logits)
