"""Graph-structured Speculative Decoding: several draft hypotheses whose recurring token
sub-sequences are merged into a directed acyclic graph, so shared parts are drafted once; the
graph is expanded into a token tree for one target verification pass."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from methods.base import DecodeContext, Paper, Settings, register, setting
from methods.common.tree import ROOT, DraftTree, TreeDrafter
from methods.common.tree_method import TreeMethod


@register("gsd")
class GraphSpeculativeDecoding(TreeMethod):
    paper = Paper("Graph-Structured Speculative Decoding", arxiv="2407.16207")
    # verified with the lossless tree rule (the drafts are the draft's deterministic top-n); the
    # paper's own non-exact-match acceptance is not used

    @dataclass
    class Config(Settings):
        # knobs and values from the official code (gzhch/gsd), whose experiments sweep them:
        candidates: int = setting(4, "top-n tokens considered under each node (the code's tree_decoding)", low=1)
        sibling_threshold: float = setting(0.2, "keep a candidate with prob >= this x the node's top prob", low=0)
        prob_threshold: float = setting(0.4, "a node below this prob is a leaf (drafting stops once all are)", low=0)
        repeat_threshold: int = setting(1, "merge a token whose previous k tokens also match; -1: no merging", low=-1)
        max_depth: int = setting(8, "draft steps per round (not fixed in the paper: ours)", low=1)
        max_nodes: int = setting(100, "size cap of the tree expanded from the graph (the official code's)", low=1)

    def draft_tree(self, ctx: DecodeContext, drafter: TreeDrafter, depth: int) -> DraftTree:
        """The draft's cache holds the graph's nodes in their own context (`tree.fed`): after
        verification it keeps those on the accepted path up to the first merged edge."""
        graph, links = self._draft_graph(drafter, depth, drafter.last_token)
        tree, real = self._expand(graph, links, depth)
        tree.fed = (graph, real)
        return tree

    def _draft_graph(self, drafter, depth: int, root_token: int):
        """Draft level by level; a candidate that repeats an existing node (same token, same k
        previous tokens, not on its own path) becomes an edge to that node instead of a new node."""
        c = self.config
        graph = DraftTree()  # the nodes the draft actually processes, with their real parents
        links: dict[int, list[int]] = {}  # node -> merged nodes it also leads to
        leaf: dict[int, bool] = {ROOT: False}
        frontier, rows = [ROOT], drafter.start(graph)[None]
        for level in range(min(depth, c.max_depth)):
            new, open_branch = [], False
            tokens, logprobs = drafter.top(rows, c.candidates, logprobs=True)
            for node, toks, lps in zip(frontier, tokens, logprobs):
                probs = [math.exp(lp) for lp in lps]
                best = probs[0]
                for prob, token in zip(probs, toks):
                    if prob < c.sibling_threshold * best:
                        continue
                    merged = self._repeat(graph, node, token, root_token)
                    if merged is not None:
                        links.setdefault(node, []).append(merged)
                        continue
                    child = graph.add(node, token)
                    leaf[child] = leaf[node] or prob < c.prob_threshold
                    open_branch |= not leaf[child]
                    new.append(child)
            if not new or not open_branch or level + 1 == min(depth, c.max_depth):
                break
            frontier, rows = new, drafter.expand(graph, new)
        return graph, links

    def _repeat(self, graph: DraftTree, parent: int, token: int, root_token: int) -> int | None:
        k = self.config.repeat_threshold
        if k < 0:
            return None
        own_path = set(graph.path(parent)) if parent != ROOT else set()
        above_root = ROOT - 1  # the root (the last accepted token) has no parent in the graph

        def up(n):
            return above_root if n == ROOT else graph.parents[n]

        def token_of(n):
            return root_token if n == ROOT else graph.tokens[n]

        for node, tok in enumerate(graph.tokens):
            if tok != token or node in own_path:
                continue
            a, b, same = parent, graph.parents[node], True
            for _ in range(k):
                if a == above_root or b == above_root or token_of(a) != token_of(b):
                    same = False
                    break
                a, b = up(a), up(b)
            if same:
                return node
        return None

    def _expand(self, graph: DraftTree, links: dict, depth: int):
        """Breadth-first expansion of the graph into a tree of at most `max_nodes` nodes and `depth`
        levels; `real[t]` is the graph node a tree node stands for if reached by real edges only."""
        tree, real = DraftTree(), {}
        queue = deque([(ROOT, ROOT, True)])  # (graph node, tree node, reached by real edges)
        while queue and len(tree) < self.config.max_nodes:
            g, t, direct = queue.popleft()
            if t != ROOT and tree.depths[t] >= depth:
                continue
            edges = [(child, True) for child in graph.draws[g]] + [(m, False) for m in links.get(g, [])]
            for target, is_child in edges:
                if len(tree) >= self.config.max_nodes:
                    break
                before = len(tree)
                node = tree.add(t, graph.tokens[target])
                if len(tree) == before:
                    continue  # the same token already under this tree node
                keep = direct and is_child
                real[node] = target if keep else None
                queue.append((target, node, keep))
        return tree, real
