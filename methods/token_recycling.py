"""Token Recycling: draft trees from an adjacency matrix of the target's own recent top-k candidates.

Row t of the matrix holds the k tokens the target last ranked highest right after token t. Each step
builds a draft tree by breadth-first search over a fixed template from the last token (template path
[i, j] = the j-th candidate after the i-th candidate after the root), verifies it in one target pass
with tree attention, and overwrites the rows of every token the pass processed (root and tree nodes)
with that pass's top-k at their positions. The matrix starts at zeros and, as in the paper's
evaluation, is kept from one prompt to the next ("hot start").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import DecodeContext, Method, Paper, register
from methods.common.tree import ROOT, DraftTree, TreeVerifier, row

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
    """Overwrite row tokens[i] with the top-k of logits[i] (in order: a token fed twice keeps its last row)."""
    k = matrix.shape[1]
    top = torch.topk(logits[:, : matrix.shape[0]].float(), k, dim=-1).indices.to(matrix.dtype).cpu()
    for token, candidates in zip(tokens, top):
        matrix[token] = candidates


@register("token_recycling")
class TokenRecycling(Method):
    paper = Paper("Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token Recycling",
                  arxiv="2408.08696", venue="ACL 2025")
    lossless = True

    @dataclass
    class Config:
        k: int = 8  # candidates kept per token (the matrix's width)
        hot_start: bool = True  # keep the matrix across prompts, as the paper's evaluation does

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        if self.config.k < 1:
            raise ValueError(f"token_recycling.k must be >= 1, got {self.config.k}")
        self.template = [p for p in TEMPLATE_2_2_2 if max(p) < self.config.k]
        self._matrix: torch.Tensor | None = None

    def matrix_for(self, vocab: int) -> torch.Tensor:
        if self._matrix is None or self._matrix.shape[0] != vocab or not self.config.hot_start:
            # int32 holds any vocabulary id at half the release's int64 footprint
            self._matrix = torch.zeros(vocab, self.config.k, dtype=torch.int32)
        return self._matrix

    def generate(self, ctx: DecodeContext) -> list[int]:
        matrix = self.matrix_for(ctx.target.config.vocab_size)
        ctx.state["adjacency_matrix"] = matrix
        depth = max(len(p) for p in self.template)
        verifier = TreeVerifier(ctx)
        while not ctx.done:
            root = verifier.pending
            tree = build_tree(matrix, root, self.template, verifier.room(depth))
            verifier.step(tree)
            # the pass's rows: the root (last committed token), then every node
            recycle(matrix, [root] + tree.tokens, verifier.last_logits[[row(ROOT)] + [row(n) for n in range(len(tree))]])
        return ctx.output
