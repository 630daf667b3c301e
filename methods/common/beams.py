"""Mechanics shared by the beam methods: their base class (`BeamMethod`, one hook: `search`), a KV cache
with one row per beam (all rows the same length), a batched forward that can also carry a forest of draft
nodes per row (tree attention through a 4D mask + position ids, so all beams and all their drafts cost ONE
pass), row/position gathering, the beams' joint distribution (`Joint`: drawing from it, reading it), and
the figures every beam method reports (diversity across its final beams).

Hot-loop rules: distributions stay on the model's device in float32; beam weights are carried as logs;
only the few drawn or ranked candidates reach the host, in one `.tolist()` per step.

Beams advance in lock-step (every beam of a method has the same length), which is what lets them
share one batched cache. Note: methods/common/tree.py (issue 4) holds single-sequence token trees;
this module is the multi-sequence counterpart, built on the same mask convention (additive float mask,
each node sees the prefix, its ancestors and itself, at position prefix + depth - 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from methods.base import BudgetExhausted, DecodeContext, Method, Sampling
from methods.common.kv import forward, new_cache
from methods.common.sampling import sample, warp

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
            mask, positions = _forest_mask(forest, prefix, width, nodes, self.model.dtype)
            kwargs = {"attention_mask": mask.to(self.model.device), "position_ids": positions.to(self.model.device)}
        out = forward(self.model, self.cache, input_ids=torch.tensor(ids, device=self.model.device),
                      logits_to_keep=1 + nodes, **kwargs)
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


def _forest_mask(forest, prefix: int, width: int, nodes: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    q = width + nodes
    visible = torch.zeros(len(forest), q, prefix + q, dtype=torch.bool)
    positions = torch.zeros(len(forest), q, dtype=torch.long)
    visible[:, :, :prefix] = True
    visible[:, :width, prefix : prefix + width] = torch.ones(width, width, dtype=torch.bool).tril()
    positions[:, :width] = torch.arange(prefix, prefix + width)
    start = prefix + width
    for r, row_nodes in enumerate(forest):
        depth: list[int] = []
        for k in range(nodes):
            visible[r, width + k, prefix : prefix + width] = True  # the pending tokens
            visible[r, width + k, start + k] = True  # itself
            if k >= len(row_nodes):  # padding: position right after the pending tokens
                positions[r, width + k] = start
                continue
            parent = row_nodes[k][1]
            if parent >= k:
                raise ValueError(f"node {k}: its parent {parent} must come before it")
            depth.append(1 if parent < 0 else depth[parent] + 1)
            while parent >= 0:
                visible[r, width + k, start + parent] = True
                parent = row_nodes[parent][1]
            positions[r, width + k] = start + depth[k] - 1
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[:, None], positions


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


def logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int]) -> torch.Tensor:
    """The target's raw log-probabilities (no temperature) of `tokens[i]` after row `rows[i]` of `logits`
    (R x V): what hypotheses are ranked by. One log-sum-exp per row, no full log-softmax."""
    index = torch.tensor(rows, device=logits.device)
    picked = logits[index, torch.tensor(tokens, device=logits.device)]
    return picked - torch.logsumexp(logits, -1)[index]


def draw_flat(probs: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    """`count` i.i.d. draws (with replacement) from a 1-D distribution, on its device: one uniform double
    per draw from the CPU `generator` (runs repeat across devices), the first index whose cumulative
    probability passes it. Float64 cumulative sums: in float32 a 600k-entry prefix sum drifts by ~1e-4."""
    u = torch.rand(count, dtype=torch.float64, generator=generator).to(probs.device)
    cumulative = probs.double().cumsum(0)
    index = torch.searchsorted(cumulative, u * cumulative[-1], right=True)
    return index.clamp_max(probs.numel() - 1).tolist()


class Joint:
    """A distribution over (beam, token) pairs: beam weight x the beam's next-token distribution (the
    run's temperature/top-k/top-p applied per beam), normalised -- what beam sampling draws from.

    Greedy runs keep it compact: each beam's next-token distribution is one-hot, so a beam has one column,
    its argmax token (`tokens`, R x 1), and nothing over the full vocabulary is built. Sampling runs keep
    all of it (`tokens` None: column c is token c). `per_beam` is each beam's own distribution, `probs`
    the joint; both R x C on the logits' device."""

    def __init__(self, logits: torch.Tensor, log_weights: list[float], sampling: Sampling,
                 tokens: torch.Tensor | None = None, per_beam: torch.Tensor | None = None) -> None:
        if per_beam is None:
            if sampling.greedy:
                tokens = logits.argmax(-1, keepdim=True)
                per_beam = torch.ones(tokens.shape, device=logits.device)
            else:
                per_beam = warp(logits, sampling)
        self.tokens, self.per_beam = tokens, per_beam
        log_w = torch.tensor(log_weights, dtype=torch.float32, device=per_beam.device)
        joint = (log_w - log_w.max()).exp()[:, None] * per_beam  # relative weights: no underflow
        self.probs = joint / joint.sum()

    def with_probs(self, probs: torch.Tensor) -> Joint:
        """The same (beam, token) entries with other probabilities (normalised here)."""
        out = Joint.__new__(Joint)
        out.tokens, out.per_beam, out.probs = self.tokens, probs, probs / probs.sum()
        return out

    def draw(self, count: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """`count` i.i.d. (beam, token) draws, as (beams, tokens). A single draw over the full vocabulary is
        made as `sample` makes it, so that one beam consumes the generator exactly as `ar` and `sps` do."""
        columns = self.probs.shape[-1]
        flat = self.probs.reshape(-1)
        picks = [sample(flat, generator)] if count == 1 and self.tokens is None else draw_flat(flat, count, generator)
        beams = [i // columns for i in picks]
        if self.tokens is None:
            return beams, [i % columns for i in picks]
        return beams, self.tokens.reshape(-1)[torch.tensor(picks, device=self.tokens.device)].tolist()

    def _lookup(self, table: torch.Tensor, beams: list[int], tokens: list[int]) -> torch.Tensor:
        index = torch.tensor(beams, device=table.device)
        wanted = torch.tensor(tokens, device=table.device)
        if self.tokens is None:
            return table[index, wanted]
        return (table[index] * (self.tokens[index] == wanted[:, None])).sum(-1)

    def at(self, beams: list[int], tokens: list[int]) -> torch.Tensor:
        """The joint probabilities of the (beams[i], tokens[i]) pairs."""
        return self._lookup(self.probs, beams, tokens)

    def per_beam_at(self, beams: list[int], tokens: list[int]) -> torch.Tensor:
        """Each beam's own probability of its token: q(token | beam)."""
        return self._lookup(self.per_beam, beams, tokens)

    def on(self, beams: list[int], other: Joint) -> torch.Tensor:
        """This joint's probabilities on `other`'s entries, where other's beam i is this one's `beams[i]`
        (len(beams) x other's columns); both built under the same sampling settings."""
        index = torch.tensor(beams, device=self.probs.device)
        if self.tokens is None:
            return self.probs[index]
        same = self.tokens[index][:, None, :] == other.tokens[:, :, None]
        return (self.probs[index][:, None, :] * same).sum(-1)
