"""RASD: retrieval candidates pruned by the draft model and fused with its draft into one verified tree.

Each step: the draft model drafts a chain; retrieval proposes continuations of the current suffix from
the context (prompt lookup, PLD-style) and from a datastore built from a local corpus (REST-style
suffix retrieval); retrieval candidates whose first token is not among the draft model's top
`prune_top_k` at the root are pruned (tree pruning); the draft chain and the kept candidates are merged
by longest common prefix into one trie (tree fusion), which the target verifies in one pass.

The paper fuses retrieval with EAGLE-2's dynamic draft tree; here the model draft is a greedy chain of
`gamma` tokens from a separate draft model (every draft in the tree is deterministic, so tree
verification stays exact under sampling). Datastore: the local corpus of `methods.common.ngram`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import DecodeContext, Method, Needs, Paper, register
from methods.common.kv import crop, extend, new_cache
from methods.common.ngram import SuffixIndex, corpus_sequences
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
    """Keep candidates whose first token is one of the draft model's `top_k` next tokens."""
    allowed = set(torch.topk(root_logits.float(), min(top_k, root_logits.shape[-1])).indices.tolist())
    return [seq for seq in candidates if seq and seq[0] in allowed]


@register("rasd")
class RetrievalAugmentedSpeculativeDecoding(Method):
    paper = Paper("RASD: Retrieval-Augmented Speculative Decoding", arxiv="2503.03434", venue="Findings of ACL 2025")
    needs = Needs(draft=True)  # the retrieval is fused with a draft model's proposals
    lossless = True

    @dataclass
    class Config:
        gamma: int = 5  # draft-model tokens per step (sps's default)
        retrieve_length: int = 10  # tokens per retrieved continuation (PLD's default)
        retrieve_count: int = 4  # continuations per source (prompt, datastore)
        prune_top_k: int = 5  # a candidate survives if its first token is in the draft's top-k: ours
        max_nodes: int = 64  # tree size cap (REST's default draft budget)
        max_ngram: int = 3  # longest suffix looked up (PLD's default)
        corpus: str = ""  # datastore text or .jsonl file; "" = the built-in question set

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        cfg = self.config
        if min(cfg.gamma, cfg.retrieve_length, cfg.retrieve_count, cfg.prune_top_k, cfg.max_nodes, cfg.max_ngram) < 1:
            raise ValueError(f"rasd's settings must all be >= 1, got {cfg}")
        self._datastore: SuffixIndex | None = None
        self._datastore_key = None

    def datastore_for(self, ctx: DecodeContext) -> SuffixIndex:
        key = (self.config.corpus, getattr(ctx.tokenizer, "name_or_path", None), self.config.max_ngram)
        if self._datastore is None or self._datastore_key != key:
            # a bare model without a tokenizer gets an empty datastore (prompt lookup still works)
            corpus = corpus_sequences(ctx.tokenizer, self.config.corpus or None) if ctx.tokenizer else []
            self._datastore = SuffixIndex(corpus, min_n=1, max_n=self.config.max_ngram)
            self._datastore_key = key
        return self._datastore

    def generate(self, ctx: DecodeContext) -> list[int]:
        cfg = self.config
        datastore = self.datastore_for(ctx)
        ctx.state["datastore"] = datastore
        verifier = TreeVerifier(ctx)
        draft_cache, draft_seen = new_cache(ctx.draft), []  # tokens the draft's cache holds
        vocab = ctx.target.config.vocab_size
        while not ctx.done:
            context = ctx.prompt_ids + ctx.output
            depth = verifier.room(max(cfg.gamma, cfg.retrieve_length))
            tree = DraftTree()
            if depth:
                common = 0
                while common < min(len(draft_seen), len(context)) and draft_seen[common] == context[common]:
                    common += 1
                crop(draft_cache, common)
                root_logits = extend(ctx.draft, context[common:], draft_cache, keep=1)[-1][:vocab]
                chain, logits = [], root_logits
                for i in range(min(cfg.gamma, depth)):
                    chain.append(int(logits.argmax()))
                    if i < min(cfg.gamma, depth) - 1:
                        logits = extend(ctx.draft, [chain[-1]], draft_cache, keep=1)[-1][:vocab]
                draft_seen = context + chain[:-1]
                length = min(cfg.retrieve_length, depth)
                retrieved = self._from_context(context, length) + datastore.continuations(
                    context, length, cfg.retrieve_count)
                tree = fuse(chain, prune(retrieved, root_logits, cfg.prune_top_k), cfg.max_nodes)
            verifier.step(tree)
        return ctx.output

    def _from_context(self, context: list[int], length: int) -> list[list[int]]:
        """Prompt lookup: continuations of the longest recurring suffix n-gram (most recent first)."""
        for n in range(min(self.config.max_ngram, len(context) - 1), 0, -1):
            suffix = context[-n:]
            found = []
            for start in range(len(context) - n - 1, -1, -1):
                if context[start:start + n] == suffix:
                    follow = context[start + n:start + n + length]
                    if follow and follow not in found:
                        found.append(follow)
                    if len(found) == self.config.retrieve_count:
                        break
            if found:
                return found
        return []
