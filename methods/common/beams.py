"""Mechanics shared by the beam methods: their base class (`BeamMethod`, one hook: `search`), a KV cache
with one row per beam (all rows the same length), a batched forward that can also carry a forest of draft
nodes per row (tree attention through a 4D mask + position ids, so all beams and all their drafts cost ONE
pass), row/position gathering, the beams' joint distribution (`Joint`: drawing from it, reading it), and
the figures every beam method reports (diversity across its final beams).

Hot loops: distributions over the vocabulary stay on the model's device in float32 (greedy decoding needs
only each beam's argmax: its joint is one number per beam, kept on the host); beam weights are carried as
logs; only the drawn or ranked candidates reach the host; beams drawn with replacement repeat, and a
repeated beam's work is done once.

Beams advance in lock-step (every beam of a method has the same length), which is what lets them
share one batched cache. Note: methods/common/tree.py (issue 4) holds single-sequence token trees;
this module is the multi-sequence counterpart, built on the same mask convention (additive float mask,
each node sees the prefix, its ancestors and itself, at position prefix + depth - 1).
"""
from __future__ import annotations

import bisect
import copy
import itertools
import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from methods.base import BudgetExhausted, DecodeContext, Method, Sampling
from methods.common import vocab
from methods.common.kv import forward, new_cache
from methods.common.sampling import sample, warp
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
        token) or the index of an earlier node of the same row. Returns float logits (rows x (1 + N) x V):
        column 0 scores what follows the pending tokens, column 1 + k what follows node k (the LM head runs
        on those positions only). Rows with fewer nodes are padded with dummy nodes that only see the prefix
        (their logits are junk)."""
        width = len(pending[0])
        if any(len(p) != width for p in pending):
            raise ValueError("every beam must have the same number of pending tokens")
        forest = forest or [[] for _ in pending]
        nodes = max((len(f) for f in forest), default=0)
        prefix = self.length
        ids = [list(toks) + [int(tok) for tok, _ in row_nodes] + [0] * (nodes - len(row_nodes))
               for toks, row_nodes in zip(pending, forest)]
        kwargs = {}
        if nodes:
            mask, positions = tree_attention([[p for _, p in f] for f in forest], prefix, width, self.model.dtype)
            kwargs = {"attention_mask": mask.to(self.model.device), "position_ids": positions.to(self.model.device)}
        out = forward(self.model, self.cache, input_ids=torch.tensor(ids, device=self.model.device),
                      logits_to_keep=1 + nodes, **kwargs)
        return out.logits.float()

    def select(self, rows: list[int], positions: list[list[int]] | None = None) -> BeamCache:
        """A new cache whose row j is old row `rows[j]` restricted to `positions[j]` (all rows the same count;
        default: every position). The old cache is left as it was."""
        # a shallow copy keeps the layer kinds without re-reading the config; the tensors are replaced below
        fresh = copy.copy(self.cache)
        fresh.layers = [copy.copy(layer) for layer in self.cache.layers]
        index = torch.tensor(rows, dtype=torch.long)
        gather = None
        if positions is not None:
            if len({len(p) for p in positions}) > 1:
                raise ValueError("every beam must keep the same number of positions")
            gather = torch.tensor(positions, dtype=torch.long)
        for layer in fresh.layers:
            keys = layer.keys.index_select(0, index.to(layer.keys.device))
            values = layer.values.index_select(0, index.to(layer.values.device))
            if gather is not None:
                g = gather.to(keys.device)[:, None, :, None]
                keys = keys.gather(2, g.expand(-1, keys.shape[1], -1, keys.shape[3]))
                values = values.gather(2, g.expand(-1, values.shape[1], -1, values.shape[3]))
            layer.keys, layer.values = keys, values
        return BeamCache(self.model, fresh)


# ---------------------------------------------------------------- the family's skeleton


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


@dataclass
class BeamRun:
    """What a beam search has so far: the tokens every beam gained in each target pass, the draft tokens
    each pass verified, and its answer candidates -- (score, hypothesis) pairs, the hypotheses it would
    choose from if it stopped now (its finished ones, or its live beams while none has finished)."""

    candidates: list[tuple[float, Hypothesis]] = field(default_factory=list)
    added: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)

    def passed(self, added: int = 1, drafted: int = 0) -> None:
        self.added.append(added)
        self.drafted.append(drafted)

    def answer(self, ctx: DecodeContext) -> None:
        """Emit the best-scoring candidate, one trace step per target pass (pass i is credited with the
        `added[i]` tokens it gave every beam -- beams advance in lock-step -- cut at the end), and report
        the diversity across the candidates."""
        if not self.candidates:
            return
        report_diversity(ctx, [hyp for _, hyp in self.candidates])
        tokens, start = max(self.candidates, key=lambda c: c[0])[1].tokens, 0
        for added, proposed in zip(self.added, self.drafted):
            ctx.emit(tokens[start : start + added], proposed=proposed)
            start += added


class BeamMethod(Method):
    """Base of the beam methods. The one hook is `search(ctx, run)`: run the search, calling
    `run.passed(...)` after every target pass and keeping `run.candidates` current. The base answers
    from `run`, the same way whether the search ended or the compute budget stopped it mid-way."""

    lossless = False  # a beam search samples or maximises sequences, not the target's token-by-token choice

    def search(self, ctx: DecodeContext, run: BeamRun) -> None:
        raise NotImplementedError

    def generate(self, ctx: DecodeContext) -> list[int]:
        run = BeamRun()
        try:
            self.search(ctx, run)
        except BudgetExhausted:
            run.answer(ctx)  # the best hypothesis so far
            raise
        run.answer(ctx)
        return ctx.output


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


def by_mean_logprob(hyps: list[Hypothesis]) -> list[tuple[float, Hypothesis]]:
    """Candidates scored by length-normalised log-probability (the best has the lowest perplexity)."""
    return [(h.mean_logprob, h) for h in hyps]


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


# ---------------------------------------------------------------- the beams' joint distribution


def rows_of(logits: torch.Tensor, rows: list[int], columns: list[int] | None = None) -> torch.Tensor:
    """logits[rows] (R x V) or logits[rows, columns] (R x C x V -> R x V): a view where the rows are a
    contiguous ascending run (and the columns one), else one gather."""
    if rows == list(range(rows[0], rows[0] + len(rows))) and (columns is None or len(set(columns)) == 1):
        span = slice(rows[0], rows[0] + len(rows))
        return logits[span] if columns is None else logits[span, columns[0]]
    index = torch.tensor(rows, device=logits.device)
    return logits[index] if columns is None else logits[index, torch.tensor(columns, device=logits.device)]


def first_of(keys: list) -> list[int]:
    """For each position, the first position with an equal key (beams holding the same sequence)."""
    first: dict = {}
    return [first.setdefault(key, i) for i, key in enumerate(keys)]


def logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int]) -> torch.Tensor:
    """The target's raw log-probabilities (no temperature) of `tokens[i]` after row `rows[i]` of `logits`
    (R x V): what hypotheses are ranked by. One fused log-softmax (cheaper than logsumexp on a CPU) over
    the span of rows named (a view, no gather)."""
    low = min(rows)
    at = torch.tensor([r - low for r in rows], device=logits.device)
    return torch.log_softmax(logits[low : max(rows) + 1], -1)[at, torch.tensor(tokens, device=logits.device)]


def joint(logits: torch.Tensor, log_weights: list[float], sampling: Sampling,
          rows: list[int] | None = None) -> Joint | GreedyJoint:
    """The beams' joint distribution over (beam, token): beam weight x the beam's next-token distribution
    (the run's temperature/top-k/top-p applied per beam), normalised -- what beam sampling draws from.
    `log_weights` are the beams' log-probabilities (any common offset); beam i's logits are
    `logits[rows[i]]` (default: row i). Beams drawn with replacement repeat: beams holding one sequence
    share a row (`first_of`), and each row named is computed once."""
    top = max(log_weights)
    weights = [math.exp(w - top) for w in log_weights]  # relative weights: no underflow
    total = sum(weights)
    rows = list(range(len(weights))) if rows is None else rows
    distinct = sorted(set(rows))
    block = rows_of(logits, distinct)
    at = None if distinct == rows else [distinct.index(r) for r in rows]
    if sampling.greedy:
        tokens = vocab.argmax(block).tolist()
        return GreedyJoint([tokens[a] for a in at] if at else tokens, [w / total for w in weights])
    per_beam = warp(block, sampling)  # rows sum to 1, so the joint's total is the weights' (one pass, no sum)
    if at:
        per_beam = per_beam[torch.tensor(at, device=per_beam.device)]
    return Joint(torch.tensor([w / total for w in weights], device=per_beam.device)[:, None] * per_beam, per_beam)


class Joint:
    """A joint distribution over (beam, token) on the model's device: `probs` (beams x V) and each beam's
    own next-token distribution `per_beam`. Read back only at the entries asked for."""

    def __init__(self, probs: torch.Tensor, per_beam: torch.Tensor | None = None) -> None:
        self.probs, self.per_beam = probs, per_beam

    def draw(self, count: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """`count` i.i.d. (beam, token) draws, as (beams, tokens). One draw from one beam's distribution is
        made as `sample` makes it, so that one beam consumes the generator exactly as `ar` and `sps` do."""
        rows, size = self.probs.shape
        flat = self.probs.reshape(-1)
        picks = ([sample(flat, generator)] if count == 1 and rows == 1
                 else vocab.sample(flat[None], count, generator)[0].tolist())
        return [i // size for i in picks], [i % size for i in picks]

    def at(self, beams: list[int], tokens: list[int]) -> list[float]:
        """The joint probabilities of the (beams[i], tokens[i]) pairs."""
        return _entries(self.probs, beams, tokens)

    def per_beam_at(self, beams: list[int], tokens: list[int]) -> list[float]:
        """Each beam's own probability of its token: q(token | beam)."""
        return _entries(self.per_beam, beams, tokens)

    def on(self, beams: list[int], other: Joint) -> torch.Tensor:
        """This joint's probabilities on `other`'s entries, other's beam i being this one's `beams[i]`."""
        return rows_of(self.probs, beams)

    def residual(self, q: torch.Tensor, t: float) -> Joint:
        """normalise(max(0, probs - t q)), q on this joint's entries: what rejections leave to sample from."""
        rest = self.probs.sub(q, alpha=t).clamp_min_(0)
        return Joint(rest / rest.sum())


class GreedyJoint:
    """The joint distribution under greedy decoding, on the host: every beam's next-token distribution is
    one-hot on its argmax (`tokens[r]`), so the joint is one number per beam (`probs[r]`) and nothing but
    the argmax is computed over the vocabulary. The same interface as `Joint`."""

    def __init__(self, tokens: list[int], probs: list[float]) -> None:
        self.tokens, self.probs = tokens, probs

    def draw(self, count: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
        ends = list(itertools.accumulate(self.probs))
        beams = [min(bisect.bisect_right(ends, u * ends[-1]), len(ends) - 1)
                 for u in torch.rand(count, dtype=torch.float64, generator=generator).tolist()]
        return beams, [self.tokens[b] for b in beams]

    def at(self, beams: list[int], tokens: list[int]) -> list[float]:
        return [self.probs[b] if self.tokens[b] == t else 0.0 for b, t in zip(beams, tokens)]

    def per_beam_at(self, beams: list[int], tokens: list[int]) -> list[float]:
        return [1.0 if self.tokens[b] == t else 0.0 for b, t in zip(beams, tokens)]

    def on(self, beams: list[int], other: GreedyJoint) -> list[float]:
        return self.at(beams, other.tokens)

    def residual(self, q: list[float], t: float) -> GreedyJoint:
        rest = [max(0.0, p - t * x) for p, x in zip(self.probs, q)]
        return GreedyJoint(self.tokens, [r / sum(rest) for r in rest])


def _entries(table: torch.Tensor, rows: list[int], columns: list[int]) -> list[float]:
    return table[torch.tensor(rows, device=table.device), torch.tensor(columns, device=table.device)].tolist()
