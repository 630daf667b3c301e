"""RASD: retrieval candidates pruned by the draft model and fused with its draft into one verified tree.

Each step: the draft model drafts a chain; retrieval proposes continuations of the current suffix from
the context (prompt lookup, PLD-style) and from a datastore built from a local corpus (REST-style
suffix retrieval); retrieval candidates whose first token is not among the draft model's top
`prune_top_k` at the root are pruned (tree pruning); the draft chain and the kept candidates are merged
by longest common prefix into one trie (tree fusion), which the target verifies in one pass.

The paper fuses retrieval with EAGLE-2's dynamic draft tree; here the model draft is a greedy chain of
`gamma` tokens from a separate draft model (every draft in the tree is deterministic, so tree
verification stays exact under sampling). Datastore: a suffix index over the `corpus` setting's file, or
else the texts the harness gives (`ctx.corpus`), built once and kept in `ctx.state` across prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from methods.base import DecodeContext, Method, Needs, Paper, Settings, register, setting
from methods.common.ngram import SuffixIndex, check_corpus, corpus_sequences, ngram_starts
from methods.common.speculation import DraftCache
from methods.common.tree import ROOT, DraftTree, TreeVerifier


def fuse(chain: list[int], candidates: list[list[int]], max_nodes: int) -> DraftTree:
    """One trie holding the draft chain and then each candidate, shared prefixes merged; a candidate
    that would take the tree past `max_nodes` is cut to fit."""
    tree = DraftTree()
    tree.add_path(chain)
    for seq in candidates:
        node, added = ROOT, 0
        for tok in seq:
            if tok not in tree.children[node] and len(tree) + 1 > max_nodes:
                break
            node = tree.add(node, tok)
            added += 1
    return tree


def prune(candidates: list[list[int]], root_logits: torch.Tensor, top_k: int) -> list[list[int]]:
    """Keep candidates whose first token is one of the draft model's `top_k` next tokens (ties at the
    k-th place kept). By rank: fewer than `top_k` tokens score higher, one comparison pass per distinct
    first token instead of a top-k over the vocabulary."""
    firsts = sorted({seq[0] for seq in candidates if seq})
    if not firsts:
        return []
    scores = root_logits.float()
    ranks = (scores[None, :] > scores[firsts][:, None]).sum(-1).tolist()
    allowed = {tok for tok, rank in zip(firsts, ranks) if rank < top_k}
    return [seq for seq in candidates if seq and seq[0] in allowed]


@register("rasd")
class RetrievalAugmentedSpeculativeDecoding(Method):
    paper = Paper("RASD: Retrieval-Augmented Speculative Decoding", arxiv="2503.03434", venue="Findings of ACL 2025")
    needs = Needs(draft=True)  # the retrieval is fused with a draft model's proposals
    lossless = True
    stateful = True

    @dataclass
    class Config(Settings):
        gamma: int = setting(5, "draft-model tokens per step (sps's default)", low=1)
        retrieve_length: int = setting(10, "tokens per retrieved continuation (PLD's default)", low=1)
        retrieve_count: int = setting(4, "continuations per source (prompt, datastore)", low=1)
        prune_top_k: int = setting(5, "a candidate survives if its first token is in the draft's top-k: ours", low=1)
        max_nodes: int = setting(64, "tree size cap (REST's default draft budget)", low=1)
        max_ngram: int = setting(3, "longest suffix looked up (PLD's default)", low=1)
        corpus: str = setting("", "datastore text or .jsonl file; empty: the texts the harness gives (the prompts)")

        def __post_init__(self) -> None:
            super().__post_init__()
            check_corpus(self.corpus)

    def datastore(self, ctx: DecodeContext) -> SuffixIndex:
        """The corpus's suffix index, kept in ctx.state across prompts (built on first use)."""
        store = ctx.state.get("datastore")
        if store is None:
            store = ctx.state["datastore"] = SuffixIndex(corpus_sequences(ctx, self.config.corpus), min_n=1,
                                                         max_n=self.config.max_ngram)
        return store

    def generate(self, ctx: DecodeContext) -> list[int]:
        cfg = self.config
        datastore = self.datastore(ctx)
        verifier = TreeVerifier(ctx)
        draft = DraftCache(ctx)
        while not ctx.done:
            context = ctx.prompt_ids + ctx.output
            depth = verifier.room(max(cfg.gamma, cfg.retrieve_length))
            tree = DraftTree()
            if depth:
                chain, _, root_logits = draft.chain(ctx, context, min(cfg.gamma, depth), sampled=False)
                length = min(cfg.retrieve_length, depth)
                retrieved = self._from_context(context, length) + datastore.continuations(
                    context, length, cfg.retrieve_count)
                tree = fuse(chain, prune(retrieved, root_logits, cfg.prune_top_k), cfg.max_nodes)
            verifier.step(tree)
        return ctx.output

    def _from_context(self, context: list[int], length: int) -> list[list[int]]:
        """Prompt lookup: continuations of the longest recurring suffix n-gram (most recent first)."""
        tokens = np.asarray(context)
        for n in range(min(self.config.max_ngram, len(context) - 1), 0, -1):
            found: list[list[int]] = []
            for start in ngram_starts(tokens, n)[::-1].tolist():
                follow = context[start + n:start + n + length]
                if follow not in found:
                    found.append(follow)
                    if len(found) == self.config.retrieve_count:
                        break
            if found:
                return found
        return []
