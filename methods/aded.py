"""ADED: drafts from a tri-gram model of the target, built by an MCTS-like search, verified as a tree.

The tri-gram "matrix" (for each token pair, the most frequent next tokens with their counts) starts from
a corpus, keeping the 12 most frequent next tokens per pair, and is updated with every verified token, so
it drifts towards the target's own output distribution as decoding goes on (kept across prompts in
`ctx.state`). Each step a search from the last two tokens balances exploitation and exploration with the
PUCT rule of the release (Q + (c1 + ln((N + c2 + 1) / c2)) * prior * sqrt(N) / (1 + n)), rolls out by
sampling the tri-gram model, backs up 1 + the sum of the roll-out's tri-gram probabilities, and turns
the most visited paths (each extended by its most likely next token) into the draft tree.

Host cost: the matrix is a pair of arrays (next tokens, counts; one row per pair), built from the corpus
in one vectorised pass. The search itself is sequential by nature (each iteration selects by what the
previous ones backed up), so it runs over flat lists: each row the search touches is read from the
arrays once, with its cumulative counts, a roll-out step is one bisection, and the random numbers of a
whole search are drawn in one call.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from methods.base import DecodeContext, Method, Paper, Settings, register, setting
from methods.common.ngram import check_corpus, corpus_sequences
from methods.common.tree import DraftTree, TreeVerifier

C1, C2 = 1.814, 8.0  # the release's PUCT constants
BITS = 21  # bits per token id in a pair key


def pair_key(a, b):
    """One int for the token pair (a, b) (ints or int64 arrays)."""
    return (a << BITS) | b


class TrigramMatrix:
    """Up to `width` next tokens per token pair with their counts: row `rows[pair_key(a, b)]` of
    `next_tokens` / `counts` belongs to the pair (a, b), most frequent first (ties: lower id), empty slots
    (count 0) last. Token ids lie in [0, 2**21) (every vocabulary in use does), so a pair is one int."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.rows: dict[int, int] = {}
        self.next_tokens = np.zeros((0, width), dtype=np.int64)
        self.counts = np.zeros((0, width), dtype=np.int64)

    @classmethod
    def from_corpus(cls, sequences: Sequence[Sequence[int]], width: int) -> TrigramMatrix:
        """Count every tri-gram of the corpus and keep the `width` most frequent next tokens of each pair."""
        matrix = cls(width)
        parts = [np.asarray(seq, dtype=np.int64) for seq in sequences if len(seq) >= 3]
        if not parts:
            return matrix
        # one int64 key per tri-gram, so counting is one sort
        triples = np.concatenate([np.stack([p[:-2], p[1:-1], p[2:]], 1) for p in parts])
        if triples.max() >= 1 << BITS or triples.min() < 0:
            raise ValueError(f"token ids must lie in [0, 2**{BITS}) for the tri-gram matrix")
        keys, count = np.unique(pair_key(pair_key(triples[:, 0], triples[:, 1]), triples[:, 2]), return_counts=True)
        pair, nxt = keys >> BITS, keys & ((1 << BITS) - 1)
        order = np.lexsort((nxt, -count, pair))  # by pair, then most frequent first, then lower id
        pair, nxt, count = pair[order], nxt[order], count[order]
        starts = np.ones(len(pair), dtype=bool)
        starts[1:] = pair[1:] != pair[:-1]
        row = np.cumsum(starts) - 1
        rank = np.arange(len(pair)) - np.flatnonzero(starts)[row]
        keep = rank < width
        matrix.next_tokens = np.zeros((int(row[-1]) + 1, width), dtype=np.int64)
        matrix.counts = np.zeros_like(matrix.next_tokens)
        matrix.next_tokens[row[keep], rank[keep]] = nxt[keep]
        matrix.counts[row[keep], rank[keep]] = count[keep]
        matrix.rows = {key: r for r, key in enumerate(pair[starts].tolist())}
        return matrix

    def add(self, tokens: Sequence[int], start: int = 0) -> None:
        """Count the tri-grams of `tokens` starting at index >= `start` (verified output as it comes). A
        next token new to a full row takes its last place (the least frequent's)."""
        for i in range(max(start, 0), len(tokens) - 2):
            row = self._row(pair_key(int(tokens[i]), int(tokens[i + 1])))
            nxt, counts = self.next_tokens[row].tolist(), self.counts[row].tolist()
            slot = next((j for j, (t, c) in enumerate(zip(nxt, counts)) if c and t == tokens[i + 2]), None)
            if slot is None:
                slot = counts.index(0) if 0 in counts else self.width - 1
                nxt[slot], counts[slot] = int(tokens[i + 2]), 0
            counts[slot] += 1
            order = sorted(range(self.width), key=lambda j: (-counts[j], nxt[j]))
            self.next_tokens[row] = [nxt[j] for j in order]
            self.counts[row] = [counts[j] for j in order]

    def _row(self, key: int) -> int:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = len(self.rows)
            if row == len(self.counts):  # grow by half, so adding rows is amortised O(1)
                grow = max(16, row // 2)
                self.next_tokens = np.concatenate([self.next_tokens, np.zeros((grow, self.width), dtype=np.int64)])
                self.counts = np.concatenate([self.counts, np.zeros((grow, self.width), dtype=np.int64)])
        return row

    def row(self, row: int) -> tuple[list[int], list[float], list[int]]:
        """A row's next tokens, their probabilities and cumulative counts (filled slots only)."""
        counts = self.counts[row].tolist()
        filled = counts.index(0) if 0 in counts else self.width
        cumulative = list(accumulate(counts[:filled]))
        total = cumulative[-1] if filled else 1
        return self.next_tokens[row, :filled].tolist(), [c / total for c in counts[:filled]], cumulative

    def __len__(self) -> int:
        return len(self.rows)


def mcts_drafts(matrix: TrigramMatrix, last_two: tuple[int, int], iterations: int, depth: int, top_k: int,
                rng: np.random.Generator) -> list[list[int]]:
    """The `top_k` most visited token paths below `last_two` (most visited first), each extended by
    the tri-gram model's most likely next token. Nodes are indices into flat lists; node 0 is the root."""
    find = matrix.rows.get
    rows: dict[int, tuple[list[int], list[float], list[int]]] = {}

    def row(r: int):
        if r not in rows:
            rows[r] = matrix.row(r)
        return rows[r]

    token, parent, prior, visits, value = [last_two[1]], [-1], [1.0], [0], [0.0]
    pair_row: list[int | None] = [find(pair_key(*last_two), -1)]  # the node's (previous token, token) row; None: not looked up
    children: list[list[int] | None] = [None]  # None: not expanded yet

    def row_of(node: int) -> int:
        if pair_row[node] is None:
            pair_row[node] = find((token[parent[node]] << BITS) | token[node], -1)
        return pair_row[node]

    uniform = rng.random(iterations * (depth + 1)).tolist()  # per iteration: an expansion pick, <= depth steps
    draw = 0
    for _ in range(iterations):
        node, length = 0, 0
        while children[node] and length < depth:  # selection: the first unvisited child, else the best PUCT
            n = visits[node]
            explore = (C1 + math.log((n + C2 + 1) / C2)) * math.sqrt(n)
            best, best_score = -1, -math.inf
            for child in children[node]:
                v = visits[child]
                if v == 0:
                    best = child
                    break
                score = value[child] / v + explore * prior[child] / (1 + v)
                if score > best_score:
                    best, best_score = child, score
            node, length = best, length + 1
        if children[node] is None and length < depth:  # expansion, then a random new child
            first = len(token)
            r = row_of(node)
            if r >= 0:
                tokens, probs, _ = row(r)
                token += tokens
                prior += probs
                parent += [node] * len(tokens)
                pair_row += [None] * len(tokens)
                visits += [0] * len(tokens)
                value += [0.0] * len(tokens)
                children += [None] * len(tokens)
            kids = children[node] = list(range(first, len(token)))
            if kids:
                node, length = kids[int(uniform[draw] * len(kids))], length + 1
            draw += 1
        score, r, last = 1.0, row_of(node), token[node]  # roll-out: sample the tri-gram model to full depth
        for _ in range(depth - length):
            if r < 0:
                break
            tokens, probs, cumulative = row(r)
            j = bisect_right(cumulative, uniform[draw] * cumulative[-1])
            draw += 1
            score += probs[j]
            r, last = find((last << BITS) | tokens[j], -1), tokens[j]
        while node >= 0:  # back-up
            visits[node] += 1
            value[node] += score
            node = parent[node]

    paths: list[tuple[int, list[int], int]] = []

    def collect(node: int, prefix: list[int]) -> None:
        for child in children[node] or ():
            if visits[child]:
                path = prefix + [token[child]]
                paths.append((visits[child], path, child))
                collect(child, path)

    collect(0, [])
    paths.sort(key=lambda vpn: (-vpn[0], len(vpn[1])))
    drafts = []
    for _, path, node in paths[:top_k]:
        best = row(row_of(node))[0][:1] if row_of(node) >= 0 else []
        drafts.append(path + best)
    return drafts


@register("aded")
class AdaptiveDraftVerification(Method):
    paper = Paper("Adaptive Draft-Verification for Efficient Large Language Model Decoding", arxiv="2407.12021",
                  venue="AAAI 2025")
    lossless = True
    stateful = True

    @dataclass
    class Config(Settings):
        num_draft: int = setting(64, "tree nodes per step at most (the release's --num-draft)", low=1)
        keep_top: int = setting(12, "next tokens kept per token pair (the release's pruning)", low=1)
        iterations: int = setting(100, "search iterations per step: ours (the release takes it as an argument)",
                                  low=1)
        depth: int = setting(6, "search depth in tokens: ours, as above", low=1)
        top_k: int = setting(16, "most visited paths turned into the tree: ours, as above", low=1)
        corpus: str = setting("", "text or .jsonl file for the initial tri-grams; empty: the texts the harness "
                                  "gives (the prompts)")

        def __post_init__(self) -> None:
            super().__post_init__()
            check_corpus(self.corpus)

    def matrix(self, ctx: DecodeContext) -> TrigramMatrix:
        """The tri-gram matrix, kept in ctx.state across prompts (built from the corpus on first use; a bare
        model without a tokenizer starts empty and learns from the output alone)."""
        matrix = ctx.state.get("trigram_matrix")
        if matrix is None:
            matrix = ctx.state["trigram_matrix"] = TrigramMatrix.from_corpus(
                corpus_sequences(ctx, self.config.corpus), self.config.keep_top)
        return matrix

    def generate(self, ctx: DecodeContext) -> list[int]:
        cfg = self.config
        matrix = self.matrix(ctx)
        rng = np.random.default_rng(ctx.sampling.seed)
        verifier = TreeVerifier(ctx)
        while not ctx.done:
            context = ctx.prompt_ids + ctx.output
            depth = verifier.room(cfg.depth)
            tree = DraftTree()
            if depth and len(context) >= 2:
                for path in mcts_drafts(matrix, (context[-2], context[-1]), cfg.iterations, depth, cfg.top_k, rng):
                    if len(tree) + len(path) > cfg.num_draft:
                        break
                    tree.add_path(path[: depth])
            verifier.step(tree)
            # adapt: the tri-grams that end in a newly verified token
            matrix.add(ctx.prompt_ids + ctx.output, start=len(context) - 2)
        return ctx.output
