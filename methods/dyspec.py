"""DySpec: a draft token tree grown greedily at run time from a priority queue keyed by draft probability."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from methods.base import DecodeContext, Paper, Settings, register, setting
from methods.common import vocab
from methods.common.tree import ROOT, DraftTree, TreeDrafter
from methods.common.tree_method import TreeMethod

FIRST_OFFER = 8  # children prepared per node at first; more when the queue asks for them


class Offer:
    """A node's children in the order they are drawn, with their draft probabilities, prepared a few at
    a time: greedy, the most likely tokens first (what the argmax of the undrawn mass gives); sampling,
    draws without replacement from q."""

    def __init__(self, drafter: TreeDrafter, logits: torch.Tensor, q: torch.Tensor | None,
                 tokens: list[int], probs: list[float]) -> None:
        self.drafter, self.logits, self.q, self.tokens, self.probs = drafter, logits, q, tokens, probs

    def child(self, j: int) -> tuple[int, float] | None:
        """The j-th child (token, q(token)); None when no undrawn token has mass left."""
        if j >= len(self.tokens) and len(self.tokens) >= FIRST_OFFER:  # the first offer ran out: double it
            want = 2 * len(self.tokens)
            if self.q is None:  # q(x) = exp(logit(x) - logit(x_1)) q(x_1): no second normaliser
                row = self.drafter.logits(self.logits)[0]
                values, tokens = vocab.top_k(row, want)
                scale = math.log(self.probs[0]) - float(row[self.tokens[0]])
                self.tokens, self.probs = tokens.tolist(), [math.exp(v + scale) for v in values.tolist()]
            else:
                self.tokens = self.drafter.distinct(self.q, want, drawn=self.tokens)
                self.probs = self.drafter.at(self.q[None], [self.tokens])[0]
        if j >= len(self.tokens) or not self.probs[j] > 0:
            return None
        return self.tokens[j], self.probs[j]


@register("dyspec")
class DySpec(TreeMethod):
    paper = Paper("DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure", arxiv="2410.11744")

    @dataclass
    class Config(Settings):
        budget: int = setting(64, "draft tokens per step (tree size); the paper's smaller budget setting", low=1)
        max_depth: int = setting(0, "deepest level drafted; 0: no limit beyond the budget and the tokens left",
                                 low=0)

    def draft_tree(self, ctx: DecodeContext, drafter: TreeDrafter, depth: int) -> DraftTree:
        """Pop the slot with the highest value, draw one more child there (without replacement),
        push the child's first slot and the parent's next slot, until `budget` nodes are drafted.

        A node's value is the product of the draft probabilities along its path (DySpec's estimate
        of its acceptance); the slot for a node's next child is valued at the node's value times
        the draft mass its drawn children leave (our reading of the paper's sibling update).
        """
        if self.config.max_depth:
            depth = min(depth, self.config.max_depth)
        tree = DraftTree(replacement=False)
        offers = self._offers(ctx, drafter, [ROOT], drafter.start(tree)[None])
        drawn_mass: dict[int, float] = {}
        value = {ROOT: 1.0}
        heap = [(-1.0, ROOT)]  # (-priority, node): a slot for one more child of node
        while heap and len(tree) < self.config.budget:
            if heap[0][1] not in offers:
                self._feed(ctx, drafter, tree, heap, offers)
            _, node = heapq.heappop(heap)
            drawn = offers[node].child(len(tree.draws[node]))
            if drawn is None:
                continue
            token, prob = drawn
            if not ctx.sampling.greedy:
                tree.set_dist(node, offers[node].q)  # drawn sequentially without replacement from q
            child = tree.add(node, token)
            value[child] = value[node] * prob
            drawn_mass[node] = drawn_mass.get(node, 0.0) + prob
            if tree.depths[child] < depth:
                heapq.heappush(heap, (-value[child], child))
            rest = value[node] * max(0.0, 1.0 - drawn_mass[node])
            if rest > 0:
                heapq.heappush(heap, (-rest, node))
        return tree

    def _offers(self, ctx: DecodeContext, drafter: TreeDrafter, nodes: list[int], rows: torch.Tensor) -> dict:
        if ctx.sampling.greedy:
            tokens, logprobs = drafter.top(rows, FIRST_OFFER, logprobs=True)
            return {node: Offer(drafter, r, None, toks, [math.exp(lp) for lp in lps])
                    for node, r, toks, lps in zip(nodes, rows, tokens, logprobs)}
        q = drafter.probs(rows)
        drawn = drafter.distinct(q, FIRST_OFFER)
        return {node: Offer(drafter, r, dist, toks, probs)
                for node, r, dist, toks, probs in zip(nodes, rows, q, drawn, drafter.at(q, drawn))}

    def _feed(self, ctx: DecodeContext, drafter: TreeDrafter, tree: DraftTree, heap: list, offers: dict) -> None:
        """One draft pass for every unfed node among the slots that can still be popped before the
        budget runs out (values only decrease, so later pops come from these or their children):
        the greedy order is unchanged, only batched."""
        left = self.config.budget - len(tree)
        nodes = sorted({node for _, node in heapq.nsmallest(left, heap) if node not in offers})
        offers.update(self._offers(ctx, drafter, nodes, drafter.expand(tree, nodes)))
