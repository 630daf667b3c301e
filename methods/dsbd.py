"""Dynamic-width Speculative Beam Decoding (Qin et al., AAAI 2025).

Per iteration: the draft runs beam sampling for gamma steps from the current target beams (W draws per
step from the draft beams' joint distribution), giving one draft tree per target beam (a forest); the
target scores the whole forest in ONE pass (tree attention, one cache row per beam). Verification goes
level by level: at depth i the target's joint distribution p over (accepted beam, token) and the draft's
q over (draft beam, token) give the adaptive width W_i = max(min_width, the largest w with
P(at least w of the W draws are accepted) >= threshold); the draws are tried in order, each accepted with
min(1, p_cur/q) where p_cur resets to p after an acceptance and becomes normalise(max(0, p_cur - q))
after a rejection (each accepted draw is then an exact sample of p). W_i acceptances: the accepted beams
are the target's beams at depth i, next level. Fewer: the iteration ends there with the accepted beams,
one sample of the last residual and fresh samples of p, W beams in all (exact i.i.d. samples of p).
All levels accepted: W bonus beams are sampled from the target's joint at depth gamma + 1. Beams ending
in end-of-sequence become candidates; the output is the candidate (or final beam) with the best
length-normalised target log-probability, as in beam sampling.

`keep_one_beam` is the paper's memory-saving modification: only one beam (one cache row) survives an
iteration, so the target keeps one sequence's cache; beams live only inside the draft forest.

Width 1 (max_width=1) is speculative sampling: one draft chain sampled from q, min(1, p/q) acceptance,
residual resampling, a bonus token from p (tests/test_dsbd.py checks it token for token against `sps`).
At temperature 0 every distribution is one-hot and DSBD reproduces greedy decoding.

Defaults: gamma 3 and threshold 0.7 as in the official evaluation, min width 1; max width 4 (the paper
sweeps 2-6; 4 is the widest beam-sampling baseline it compares with). Choices where the paper leaves room:
the draft starts each iteration from the target's beam weights (its proposal then differs from the
target's only through the token distributions); top-k/top-p are applied per beam as in `beam_sampling`.
Not lossless: it samples beam-sampling's distribution, not the target's token-by-token one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import BudgetExhausted, DecodeContext, Method, Needs, Paper, register
from methods.common.beams import (
    BeamCache,
    Hypothesis,
    best_by_mean_logprob,
    cut,
    draw,
    emit_per_pass,
    finished,
    joint_probs,
    report_diversity,
)
from methods.common.sampling import on_target_vocab, warp
from methods.common.verify import residual


def accepted_count_distribution(p: torch.Tensor, q: torch.Tensor, draws: int) -> torch.Tensor:
    """P(K = k), k = 0..draws: how many of `draws` i.i.d. draws from q the sequential rule accepts
    (accept with min(1, p_cur/q); p_cur -> p after an acceptance, -> residual(p_cur, q) after a rejection).
    After s rejections in a row the acceptance probability is sum(min(p_s, q))."""
    alphas, p_s = [], p
    for _ in range(draws):
        alphas.append(float(torch.minimum(p_s, q).sum()))
        p_s = residual(p_s, q)
    state = {(0, 0): 1.0}  # (accepted so far, rejections since the last acceptance) -> probability
    for _ in range(draws):
        nxt: dict[tuple[int, int], float] = {}
        for (k, s), prob in state.items():
            a = alphas[s]
            nxt[(k + 1, 0)] = nxt.get((k + 1, 0), 0.0) + prob * a
            nxt[(k, s + 1)] = nxt.get((k, s + 1), 0.0) + prob * (1 - a)
        state = nxt
    out = torch.zeros(draws + 1, dtype=torch.float64)
    for (k, _), prob in state.items():
        out[k] += prob
    return out


def adaptive_width(p: torch.Tensor, q: torch.Tensor, draws: int, threshold: float, min_width: int) -> int:
    """The paper's width rule: the largest w with P(K >= w) >= threshold, at least `min_width`, at most `draws`."""
    at_least = accepted_count_distribution(p, q, draws).flip(0).cumsum(0).flip(0)  # P(K >= w), w = 0..draws
    width = max(w for w in range(draws + 1) if at_least[w] >= threshold - 1e-12)
    return min(draws, max(min_width, width))


@dataclass
class _Beam:
    hyp: Hypothesis
    weight: float  # the target's joint probability of the beam (unnormalised)
    row: int  # target cache row its tree hangs from
    node: int  # its node in that row's forest; -1 = the row's pending token
    draft_index: int  # its index among the draft beams of its depth (depth 0: the row)


@register("dsbd")
class DynamicWidthSpeculativeBeamDecoding(Method):
    paper = Paper("Dynamic-Width Speculative Beam Decoding for Efficient LLM Inference", arxiv="2409.16560",
                  venue="AAAI 2025")
    needs = Needs(draft=True)
    lossless = False

    @dataclass
    class Config:
        gamma: int = 3  # draft beam-sampling steps per iteration
        max_width: int = 4  # W: draft draws per step, and target beams kept between iterations
        min_width: int = 1
        width_threshold: float = 0.7  # the width rule's probability threshold
        keep_one_beam: bool = False  # the memory-saving modification: one beam (cache row) between iterations

    def generate(self, ctx: DecodeContext) -> list[int]:
        c = self.config
        if c.max_width < 1 or not 1 <= c.min_width <= c.max_width or c.gamma < 0 or not 0 < c.width_threshold <= 1:
            raise ValueError("dsbd needs max_width >= min_width >= 1, gamma >= 0, 0 < width_threshold <= 1")
        self.vocab = ctx.target.config.vocab_size
        target, draft = BeamCache(ctx.target), BeamCache(ctx.draft)
        target_pending, draft_pending = [list(ctx.prompt_ids)], [list(ctx.prompt_ids)]
        beams = [_Beam(Hypothesis(), 1.0, 0, -1, 0)]
        done: list[Hypothesis] = []
        per_pass: list[int] = []
        drafted: list[int] = []  # draft tokens in each pass's forest, all rows
        widths: list[int] = []
        try:
            while beams:
                gamma = max(0, min(c.gamma, ctx.max_new_tokens - len(beams[0].hyp.tokens) - 1))
                levels, snapshots = self._draft(ctx, draft, draft_pending, beams, gamma)
                forest, node_of = _forest(beams, levels)
                logits = target.feed(target_pending, forest)[..., : self.vocab]
                width_pending = len(target_pending[0])
                new, depth, all_accepted = self._verify(ctx, beams, levels, logits, node_of, width_pending, widths)
                per_pass.append(depth + 1)
                drafted.append(sum(len(tree) for tree in forest))
                keep = []
                for beam, token in new:
                    if finished(beam.hyp, ctx):
                        done.append(cut(beam.hyp, ctx))
                    else:
                        keep.append((beam, token))
                if not keep:
                    beams = []
                    break
                target, target_pending = self._target_cache(target, forest, keep, width_pending)
                draft, draft_pending = self._draft_cache(draft, draft_pending, snapshots, levels, keep, depth,
                                                         all_accepted)
                beams = [_Beam(b.hyp, b.weight, j, -1, j) for j, (b, _) in enumerate(keep)]
        except BudgetExhausted:
            self._finish(ctx, done, beams, per_pass, drafted, widths)
            raise
        self._finish(ctx, done, beams, per_pass, drafted, widths)
        return ctx.output

    # ------------------------------------------------------------ draft: beam sampling, gamma steps

    def _draft(self, ctx, draft: BeamCache, pending, beams, gamma):
        """Per depth i = 1..gamma: (parents among depth i-1 draft beams, tokens, q over (parent, token)), and the
        draft caches after each step (rows = draft beams of depth i-1, their own tokens included)."""
        weights = torch.tensor([b.weight for b in beams], dtype=torch.float64)
        levels, snapshots, cache = [], [], draft
        for i in range(gamma):
            logits = on_target_vocab(cache.feed(pending)[:, -1], self.vocab)
            snapshots.append(cache)
            q = joint_probs(weights, logits, ctx.sampling).double().cpu()
            picks = draw(q, self.config.max_width, ctx.generator)
            parents, tokens = [p // self.vocab for p in picks], [p % self.vocab for p in picks]
            levels.append((parents, tokens, picks, q))
            weights = q[torch.tensor(picks)]
            if i < gamma - 1:
                cache, pending = cache.select(parents), [[t] for t in tokens]
        return levels, snapshots

    # ------------------------------------------------------------ verification, level by level

    def _verify(self, ctx, beams, levels, logits, node_of, width_pending, widths):
        """Returns the new beams as (beam, token it adds after its base) pairs, the depth of their bases, and
        whether every level was accepted."""
        c = self.config
        n_final = 1 if c.keep_one_beam else c.max_width
        valid = beams  # the target's beams at depth i - 1
        draft_count = len(beams)  # draft beams at depth i - 1 (depth 0: the target's rows)
        for depth, (parents, tokens, picks, q) in enumerate(levels, start=1):
            p, rows = self._target_joint(ctx, valid, logits, width_pending, draft_count)
            width = adaptive_width(p, q, c.max_width, c.width_threshold, c.min_width)
            widths.append(width)
            accepted, p_cur = [], p
            for j, index in enumerate(picks):
                if len(accepted) == width:
                    break
                u = float(torch.rand((), generator=ctx.generator))
                if q[index] > 0 and u * float(q[index]) < float(p_cur[index]):
                    accepted.append(j)
                    p_cur = p
                else:
                    p_cur = residual(p_cur, q)
            if len(accepted) < width:  # stop at this depth: accepted + residual sample + fresh samples of p
                picks_out = [picks[j] for j in accepted][:n_final]
                if len(picks_out) < n_final:
                    picks_out += draw(p_cur.float(), 1, ctx.generator)
                if len(picks_out) < n_final:
                    picks_out += draw(p.float(), n_final - len(picks_out), ctx.generator)
                return self._extend(valid, rows, picks_out, p, logits, width_pending), depth - 1, False
            valid = [self._child(valid[rows[parents[j]]], j, tokens[j], float(p[picks[j]]), node_of[depth - 1][j],
                                 logits, width_pending) for j in accepted]
            draft_count = len(parents)
        p, rows = self._target_joint(ctx, valid, logits, width_pending, len(valid), own_index=True)
        picks_out = draw(p.float(), n_final, ctx.generator)
        return self._extend(valid, rows, picks_out, p, logits, width_pending, own_index=True), len(levels), True

    def _target_joint(self, ctx, valid, logits, width_pending, draft_count, own_index=False):
        """p over (draft beam of this depth, token), flattened, non-zero on the target's valid beams only;
        and the map from draft beam index to the position in `valid`."""
        vocab = self.vocab
        p = torch.zeros(draft_count, vocab, dtype=torch.float64)
        rows: dict[int, int] = {}
        for v, beam in enumerate(valid):
            index = v if own_index else beam.draft_index
            rows[index] = v
            column = width_pending - 1 if beam.node < 0 else width_pending + beam.node
            p[index] = beam.weight * warp(logits[beam.row, column], ctx.sampling).double().cpu()
        return (p / p.sum()).reshape(-1), rows

    def _child(self, parent: _Beam, index, token, weight, node, logits, width_pending) -> _Beam:
        logp = float(torch.log_softmax(self._row(parent, logits, width_pending), -1)[token])
        return _Beam(parent.hyp.extended(token, logp), weight, parent.row, node[1], index)

    def _extend(self, valid, rows, picks, p, logits, width_pending, own_index=False):
        out = []
        for pick in picks:
            index, token = pick // self.vocab, pick % self.vocab
            base = valid[rows[index]]
            logp = float(torch.log_softmax(self._row(base, logits, width_pending), -1)[token])
            out.append((_Beam(base.hyp.extended(token, logp), float(p[pick]), base.row, base.node, base.draft_index),
                        token))
        return out

    @staticmethod
    def _row(beam: _Beam, logits, width_pending) -> torch.Tensor:
        return logits[beam.row, width_pending - 1 if beam.node < 0 else width_pending + beam.node].float()

    # ------------------------------------------------------------ caches for the next iteration

    @staticmethod
    def _target_cache(target: BeamCache, forest, keep, width_pending):
        """Row j: its base's row, prefix + pending + the base's node path; its new token becomes pending."""
        prefix = target.length - width_pending - max((len(f) for f in forest), default=0)
        rows, positions = [], []
        for beam, _ in keep:
            path, node = [], beam.node
            while node >= 0:
                path.append(prefix + width_pending + node)
                node = forest[beam.row][node][1]
            rows.append(beam.row)
            positions.append(list(range(prefix + width_pending)) + path[::-1])
        return target.select(rows, positions), [[token] for _, token in keep]

    @staticmethod
    def _draft_cache(draft, draft_pending, snapshots, levels, keep, depth, all_accepted):
        """The draft cache whose rows hold the new beams' bases (snapshots[d] rows = draft beams of depth d)."""
        if not snapshots:  # gamma 0: the draft saw nothing this iteration
            rows = [beam.row for beam, _ in keep]
            return draft.select(rows), [draft_pending[r] + [token] for r, (_, token) in zip(rows, keep)]
        if all_accepted:  # the deepest draft tokens were never fed to the draft: they join the pending tokens
            parents, tokens = levels[-1][0], levels[-1][1]
            rows = [parents[beam.draft_index] for beam, _ in keep]
            return (snapshots[-1].select(rows),
                    [[tokens[beam.draft_index], token] for beam, token in keep])
        rows = [beam.draft_index for beam, _ in keep]
        return snapshots[depth].select(rows), [[token] for _, token in keep]

    @staticmethod
    def _finish(ctx, done, beams, per_pass, drafted, widths):
        pool = done + [cut(b.hyp, ctx) for b in beams]  # beams left over: a budget stop
        if widths:
            ctx.extras["dsbd_mean_width"] = sum(widths) / len(widths)
        report_diversity(ctx, [cut(b.hyp, ctx) for b in beams] or done)
        if pool:
            emit_per_pass(ctx, best_by_mean_logprob(pool).tokens, per_pass, drafted)


def _forest(beams: list[_Beam], levels) -> tuple[list[list[tuple[int, int]]], list[list[tuple[int, int]]]]:
    """Each target row's draft tree as (token, parent node) lists, shared prefixes merged; and for every
    draft beam of every depth its (row, node)."""
    forest: list[list[tuple[int, int]]] = [[] for _ in beams]
    index: dict[tuple[int, int, int], int] = {}
    node_of: list[list[tuple[int, int]]] = []
    above = [(b.row, -1) for b in beams]  # depth 0: (row, node) of each draft beam
    for parents, tokens, _, _ in levels:
        here = []
        for parent, token in zip(parents, tokens):
            row, parent_node = above[parent]
            key = (row, parent_node, token)
            if key not in index:
                index[key] = len(forest[row])
                forest[row].append((token, parent_node))
            here.append((row, index[key]))
        node_of.append(here)
        above = here
    return forest, node_of
