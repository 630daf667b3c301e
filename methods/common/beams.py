"""Mechanics shared by the beam methods: a KV cache with one row per beam (all rows the same length),
a batched forward that can also carry a forest of draft nodes per row (tree attention through a 4D
mask + position ids, so all beams and all their drafts cost ONE pass), row/position gathering, the
beam-sampling step, and the figures every beam method reports (diversity across its final beams).

Beams advance in lock-step (every beam of a method has the same length), which is what lets them
share one batched cache. Note: methods/common/tree.py (issue 4) holds single-sequence token trees;
this module is the multi-sequence counterpart, built on the same mask convention (additive float mask,
each node sees the prefix, its ancestors and itself, at position prefix + depth - 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from methods.base import DecodeContext, Sampling
from methods.common.kv import forward, new_cache
from methods.common.sampling import warp
from methods.common.tree import tree_attention

NEG_INF = float("-inf")


class BeamCache:
    """One model's KV cache with one row per beam; every row holds `length` positions."""

    def __init__(self, model: torch.nn.Module, cache: DynamicCache | None = None) -> None:
        self.model = model
        self.cache = cache if cache is not None else new_cache(model)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @property
    def rows(self) -> int:
        layer = self.cache.layers[0] if self.cache.layers else None
        return int(layer.keys.shape[0]) if layer is not None and getattr(layer, "keys", None) is not None else 0

    def feed(self, pending: list[list[int]], forest: list[list[tuple[int, int]]] | None = None) -> torch.Tensor:
        """ONE forward pass. Row r gets its `pending[r]` tokens (causal; every row the same count) and then
        the draft nodes `forest[r]`: (token, parent) pairs where parent is -1 (a child of the last pending
        token) or the index of an earlier node of the same row. Returns float logits (rows x (P + N) x V):
        column P - 1 scores what follows the pending tokens, column P + k what follows node k.
        Rows with fewer nodes are padded with dummy nodes that only see the prefix (their logits are junk)."""
        width = len(pending[0])
        if any(len(p) != width for p in pending):
            raise ValueError("every beam must have the same number of pending tokens")
        forest = forest or [[] for _ in pending]
        nodes = max((len(f) for f in forest), default=0)
        prefix, q = self.length, width + nodes
        ids = torch.zeros(len(pending), q, dtype=torch.long)
        for r, (toks, row_nodes) in enumerate(zip(pending, forest)):
            ids[r, :width] = torch.tensor(toks, dtype=torch.long)
            for k, (tok, _) in enumerate(row_nodes):
                ids[r, width + k] = int(tok)
        kwargs = {}
        if nodes:
            mask, positions = tree_attention([[p for _, p in f] for f in forest], prefix, width, self.model.dtype)
            kwargs = {"attention_mask": mask.to(self.model.device), "position_ids": positions.to(self.model.device)}
        out = forward(self.model, self.cache, input_ids=ids.to(self.model.device), **kwargs)
        return out.logits.float()

    def select(self, rows: list[int], positions: list[list[int]] | None = None) -> BeamCache:
        """A new cache whose row j is old row `rows[j]` restricted to `positions[j]` (all rows the same count;
        default: every position). The old cache is left as it was."""
        fresh = new_cache(self.model)
        index = torch.tensor(rows, dtype=torch.long)
        gather = None
        if positions is not None:
            if len({len(p) for p in positions}) > 1:
                raise ValueError("every beam must keep the same number of positions")
            gather = torch.tensor(positions, dtype=torch.long)
        for layer_idx, layer in enumerate(self.cache.layers):
            keys, values = layer.keys.index_select(0, index.to(layer.keys.device)), None
            values = layer.values.index_select(0, index.to(layer.values.device))
            if gather is not None:
                g = gather.to(keys.device)[:, None, :, None]
                keys = keys.gather(2, g.expand(-1, keys.shape[1], -1, keys.shape[3]))
                values = values.gather(2, g.expand(-1, values.shape[1], -1, values.shape[3]))
            fresh.update(keys, values, layer_idx)
        return BeamCache(self.model, fresh)


# ---------------------------------------------------------------- beam sampling


def joint_probs(weights: torch.Tensor, logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The beams' joint distribution over (beam, token), flattened: weight(beam) x warp(logits of beam),
    normalised. `weights` are the beams' (unnormalised) probabilities; a weight of 0 drops a beam."""
    per_token = warp(logits, sampling)  # rows: beams
    joint = weights[:, None].float().to(per_token.device) * per_token
    total = joint.sum()
    if total <= 0:
        raise ValueError("no live beam to extend")
    return (joint / total).reshape(-1)


def draw(probs: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    """`count` i.i.d. draws (with replacement, as beam sampling does) from a flattened distribution."""
    return torch.multinomial(probs.detach().cpu(), count, replacement=True, generator=generator).tolist()


# ---------------------------------------------------------------- hypotheses and reporting


@dataclass
class Hypothesis:
    """A finished or surviving beam: its new tokens and the target's raw log-probability of each."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def extended(self, token: int, logprob: float) -> Hypothesis:
        return Hypothesis(self.tokens + [int(token)], self.logprobs + [float(logprob)])

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else NEG_INF


def cut(hyp: Hypothesis, ctx: DecodeContext) -> Hypothesis:
    """The hypothesis up to and including its first end-of-sequence token, and at most max_new_tokens."""
    end = min(len(hyp.tokens), ctx.max_new_tokens)
    for i, tok in enumerate(hyp.tokens[:end]):
        if tok in ctx.eos_token_ids:
            end = i + 1
            break
    return Hypothesis(hyp.tokens[:end], hyp.logprobs[:end])


def finished(hyp: Hypothesis, ctx: DecodeContext) -> bool:
    return len(hyp.tokens) >= ctx.max_new_tokens or any(t in ctx.eos_token_ids for t in hyp.tokens)


def best_by_mean_logprob(hyps: list[Hypothesis]) -> Hypothesis:
    """The hypothesis with the highest length-normalised log-probability (= the lowest perplexity)."""
    return max(hyps, key=lambda h: h.mean_logprob)


def distinct_ngrams(sequences: list[list[int]], n: int) -> float | None:
    """Distinct n-grams across all `sequences` over all n-grams in them (1.0: no n-gram repeats across
    or within the beams); None when no sequence has n tokens."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def report_diversity(ctx: DecodeContext, final_beams: list[Hypothesis]) -> None:
    """Distinct-1/-2 across the method's final beams, into ctx.extras."""
    seqs = [h.tokens for h in final_beams]
    for n in (1, 2):
        value = distinct_ngrams(seqs, n)
        if value is not None:
            ctx.extras[f"beam_distinct_{n}"] = value


def emit_per_pass(ctx: DecodeContext, tokens: list[int], per_pass: list[int], drafted: list[int] | None = None) -> None:
    """Emit the chosen beam as the method's output, one trace step per target pass: pass i is credited
    with the `per_pass[i]` tokens it added to every beam (beams advance in lock-step), cut at the end, and
    with `drafted[i]` draft tokens verified (none for the autoregressive beam baselines)."""
    start = 0
    for added, proposed in zip(per_pass, drafted or [0] * len(per_pass)):
        ctx.emit(tokens[start : start + added], proposed=proposed)
        start += added
