"""ADED: drafts from a tri-gram model of the target, built by an MCTS-like search, verified as a tree.

The tri-gram "matrix" (counts of the token after each token pair) starts from a local corpus, pruned to
the 12 most frequent next tokens per pair, and is updated with every verified token, so it drifts
towards the target's own output distribution as decoding goes on (kept across prompts). Each step a
search from the last two tokens balances exploitation and exploration with the PUCT rule of the
release (Q + (c1 + ln((N + c2 + 1) / c2)) * prior * sqrt(N) / (1 + n)), rolls out by sampling the
tri-gram model, backs up 1 + the sum of the roll-out's tri-gram probabilities, and turns the most
visited paths (each extended by its most likely next token) into the draft tree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from methods.base import DecodeContext, Method, Paper, register
from methods.common.ngram import NGramTable, corpus_sequences
from methods.common.tree import DraftTree, TreeVerifier

C1, C2 = 1.814, 8.0  # the release's PUCT constants


@dataclass
class SearchNode:
    pair: tuple[int, int]  # (previous token, this node's token)
    prior: float
    parent: SearchNode | None = None
    children: list[SearchNode] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0
    expanded: bool = False

    def puct(self, parent_visits: int) -> float:
        if self.visits == 0:
            return math.inf
        explore = (C1 + math.log((parent_visits + C2 + 1) / C2)) * self.prior * math.sqrt(parent_visits)
        return self.value / self.visits + explore / (1 + self.visits)


def mcts_drafts(table: NGramTable, last_two: tuple[int, int], iterations: int, depth: int, top_k: int,
                rng: np.random.Generator) -> list[list[int]]:
    """The `top_k` most visited token paths below `last_two` (most visited first), each extended by
    the tri-gram model's most likely next token."""
    root = SearchNode(last_two, 1.0)

    def expand(node: SearchNode) -> None:
        node.expanded = True
        for token, p in table.top(node.pair, len(table.next_counts(node.pair))):
            node.children.append(SearchNode((node.pair[1], token), p, node))

    for _ in range(iterations):
        node, length = root, 0
        while node.expanded and node.children and length < depth:  # selection
            node = max(node.children, key=lambda c: c.puct(node.visits))
            length += 1
        if not node.expanded and length < depth:  # expansion
            expand(node)
            if node.children:
                node = node.children[int(rng.integers(len(node.children)))]
                length += 1
        score, pair = 1.0, node.pair  # roll-out: sample the tri-gram model to the full depth
        for _ in range(depth - length):
            options = table.top(pair, len(table.next_counts(pair)))
            if not options:
                break
            tokens, probs = zip(*options)
            pick = int(rng.choice(len(tokens), p=np.asarray(probs) / sum(probs)))
            score += probs[pick]
            pair = (pair[1], tokens[pick])
        while node is not None:  # back-up
            node.visits += 1
            node.value += score
            node = node.parent
    paths: list[tuple[int, list[int]]] = []

    def collect(node: SearchNode, prefix: list[int]) -> None:
        for child in node.children:
            if child.visits:
                path = prefix + [child.pair[1]]
                paths.append((child.visits, path))
                collect(child, path)

    collect(root, [])
    paths.sort(key=lambda vp: (-vp[0], len(vp[1])))
    drafts = []
    for _, path in paths[:top_k]:
        pair = (last_two[1], path[0]) if len(path) == 1 else (path[-2], path[-1])
        best = table.top(pair, 1)
        drafts.append(path + [best[0][0]] if best else path)
    return drafts


@register("aded")
class AdaptiveDraftVerification(Method):
    paper = Paper("Adaptive Draft-Verification for Efficient Large Language Model Decoding", arxiv="2407.12021",
                  venue="AAAI 2025")
    lossless = True

    @dataclass
    class Config:
        num_draft: int = 64  # tree nodes per step at most (the release's --num-draft)
        keep_top: int = 12  # next tokens kept per token pair after reading the corpus (the release's pruning)
        iterations: int = 100  # search iterations per step: ours (the release takes it as an argument)
        depth: int = 6  # search depth in tokens: ours, as above
        top_k: int = 16  # most visited paths turned into the tree: ours, as above
        corpus: str = ""  # text or .jsonl file for the initial tri-grams; "" = the built-in question set

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        cfg = self.config
        if min(cfg.num_draft, cfg.keep_top, cfg.iterations, cfg.depth, cfg.top_k) < 1:
            raise ValueError(f"aded's num_draft, keep_top, iterations, depth and top_k must be >= 1, got {cfg}")
        self._table: NGramTable | None = None
        self._table_key = None

    def table_for(self, ctx: DecodeContext) -> NGramTable:
        key = (ctx.target.config.vocab_size, self.config.corpus, getattr(ctx.tokenizer, "name_or_path", None))
        if self._table is None or self._table_key != key:
            table = NGramTable(3)
            # a bare model without a tokenizer gets no corpus: the table then learns from the output alone
            corpus = corpus_sequences(ctx.tokenizer, self.config.corpus or None) if ctx.tokenizer else []
            for seq in corpus:
                table.add(seq)
            table.prune(self.config.keep_top)
            self._table, self._table_key = table, key
        return self._table

    def generate(self, ctx: DecodeContext) -> list[int]:
        cfg = self.config
        table = self.table_for(ctx)
        ctx.state["trigram_table"] = table
        rng = np.random.default_rng(ctx.sampling.seed)
        verifier = TreeVerifier(ctx)
        while not ctx.done:
            context = ctx.prompt_ids + ctx.output
            depth = verifier.room(cfg.depth)
            tree = DraftTree()
            if depth and len(context) >= 2:
                for path in mcts_drafts(table, (context[-2], context[-1]), cfg.iterations, depth, cfg.top_k, rng):
                    if len(tree) + len(path) > cfg.num_draft:
                        break
                    tree.add_path(path[: depth])
            verifier.step(tree)
            # adapt: the tri-grams that end in a newly verified token
            table.add(ctx.prompt_ids + ctx.output, start=len(context) - 2)
        return ctx.output
