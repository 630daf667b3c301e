"""DySpec: a draft token tree grown greedily at run time from a priority queue keyed by draft probability."""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import partial

import torch

from methods.base import DecodeContext, Method, Needs, Paper, register
from methods.common.sampling import sample
from methods.common.tree import ROOT, DraftTree
from methods.common.tree_method import run_tree_method


@register("dyspec")
class DySpec(Method):
    paper = Paper("DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure", arxiv="2410.11744")
    needs = Needs(draft=True)
    lossless = True

    @dataclass
    class Config:
        budget: int = 64  # draft tokens per step (tree size); the paper's smaller budget setting
        max_depth: int = 0  # 0: no limit beyond the budget (and the tokens left to generate)

        def __post_init__(self):
            if self.budget < 1 or self.max_depth < 0:
                raise ValueError("dyspec.budget must be positive and dyspec.max_depth >= 0")

    def generate(self, ctx: DecodeContext) -> list[int]:
        return run_tree_method(ctx, partial(self.draft_tree, ctx))

    def draft_tree(self, ctx: DecodeContext, drafter, depth: int) -> DraftTree:
        """Pop the slot with the highest value, draw one more child there (without replacement),
        push the child's first slot and the parent's next slot, until `budget` nodes are drafted.

        A node's value is the product of the draft probabilities along its path (DySpec's estimate
        of its acceptance); the slot for a node's next child is valued at the node's value times
        the draft mass its drawn children leave (our reading of the paper's sibling update).
        """
        if self.config.max_depth:
            depth = min(depth, self.config.max_depth)
        tree = DraftTree(replacement=False)
        dists: dict[int, torch.Tensor] = {ROOT: drafter.dist(drafter.start(tree))}
        drawn_mass: dict[int, float] = {}
        value = {ROOT: 1.0}
        heap = [(-1.0, ROOT)]  # (-priority, node): a slot for one more child of node
        while heap and len(tree) < self.config.budget:
            if heap[0][1] not in dists:
                self._feed(drafter, tree, heap, dists)
            neg, node = heapq.heappop(heap)
            q = dists[node]
            residual = q.clone()
            for child in tree.draws[node]:
                residual[tree.tokens[child]] = 0.0
            mass = float(residual.sum())
            if mass <= 0:
                continue
            if ctx.sampling.greedy:
                token = int(residual.argmax())
            else:
                tree.set_dist(node, q)  # drawn sequentially without replacement from q
                token = sample(residual / mass, ctx.generator)
            child = tree.add(node, token)
            value[child] = value[node] * float(q[token])
            drawn_mass[node] = drawn_mass.get(node, 0.0) + float(q[token])
            if tree.depths[child] < depth:
                heapq.heappush(heap, (-value[child], child))
            rest = value[node] * max(0.0, 1.0 - drawn_mass[node])
            if rest > 0:
                heapq.heappush(heap, (-rest, node))
        return tree

    def _feed(self, drafter, tree: DraftTree, heap: list, dists: dict) -> None:
        """One draft pass for every unfed node among the slots that can still be popped before the
        budget runs out (values only decrease, so later pops come from these or their children):
        the greedy order is unchanged, only batched."""
        left = self.config.budget - len(tree)
        nodes = sorted({node for _, node in heapq.nsmallest(left, heap) if node not in dists})
        for node, logits in zip(nodes, drafter.expand(tree, nodes)):
            dists[node] = drafter.dist(logits)
