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
residual resampling, a bonus token from p (tests/test_dsbd_mjsd.py checks it token for token against `sps`).
At temperature 0 every distribution is one-hot and DSBD reproduces greedy decoding.

Exactness: the width rule and the acceptance use the chain of residuals after s rejections in a row in
closed form (`residual_chain`): one float32 pass over the target's beams per s, on the device, instead
of a float64 copy of the joint distribution per residual on the host.

Defaults: gamma 3 and threshold 0.7 as in the official evaluation, min width 1; max width 4 (the paper
sweeps 2-6; 4 is the widest beam-sampling baseline it compares with). Choices where the paper leaves room:
the draft starts each iteration from the target's beam weights (its proposal then differs from the
target's only through the token distributions); top-k/top-p are applied per beam as in `beam_sampling`.
Not lossless: it samples beam-sampling's distribution, not the target's token-by-token one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.base import DecodeContext, Needs, Paper, SettingError, Settings, register, setting
from methods.common.beams import (
    BeamCache,
    BeamMethod,
    BeamRun,
    Hypothesis,
    by_mean_logprob,
    cut,
    finished,
    first_of,
    joint,
    logprobs,
    rows_of,
)
from methods.common.sampling import on_target_vocab


def residual_chain(p, q, draws: int) -> tuple[list[float], list[float], list[float]]:
    """The residuals after s = 0..draws rejections in a row, p_s = max(0, p - t_s q) / n_s, as (alphas, t, n):
    alphas[s] = sum(min(p_s, q)) is the acceptance probability of a draw after s rejections (s < draws).
    p and q: tensors (on any device, any shape) or lists of floats, on the same entries.

    Closed form of p_{s+1} = residual(p_s, q): max(0, p_s - q) = max(0, p - (t_s + n_s) q) / n_s, so
    t_{s+1} = t_s + n_s, n_{s+1} = sum(max(0, p - t_{s+1} q)), and sum(min(p_s, q)) = 1 - n_{s+1} / n_s.
    Where nothing is left (n_{s+1} = 0) `residual` keeps p_s: t and n stay. One pass over p per s."""
    t, n = 0.0, float(sum(p)) if isinstance(p, list) else float(p.sum())
    alphas, ts, ns = [], [t], [n]
    for _ in range(draws):
        left = _excess(p, q, t + n)
        alphas.append(1 - left / n)
        if left > 0:
            t, n = t + n, left
        ts.append(t)
        ns.append(n)
    return alphas, ts, ns


def _excess(p, q, t: float) -> float:
    """sum(max(0, p - t q))."""
    if isinstance(p, list):
        return sum(max(0.0, a - t * b) for a, b in zip(p, q))
    return float(p.sub(q, alpha=t).clamp_min_(0).sum())


def count_distribution(alphas: list[float]) -> torch.Tensor:
    """P(K = k), k = 0..len(alphas): how many draws the sequential rule accepts when a draw after s
    rejections in a row is accepted with probability alphas[s] (an acceptance resets s)."""
    state = {(0, 0): 1.0}  # (accepted so far, rejections since the last acceptance) -> probability
    for _ in alphas:
        nxt: dict[tuple[int, int], float] = {}
        for (k, s), prob in state.items():
            a = alphas[s]
            nxt[(k + 1, 0)] = nxt.get((k + 1, 0), 0.0) + prob * a
            nxt[(k, s + 1)] = nxt.get((k, s + 1), 0.0) + prob * (1 - a)
        state = nxt
    out = torch.zeros(len(alphas) + 1, dtype=torch.float64)
    for (k, _), prob in state.items():
        out[k] += prob
    return out


def accepted_count_distribution(p: torch.Tensor, q: torch.Tensor, draws: int) -> torch.Tensor:
    """P(K = k), k = 0..draws: how many of `draws` i.i.d. draws from q the sequential rule accepts
    (accept with min(1, p_cur/q); p_cur -> p after an acceptance, -> residual(p_cur, q) after a rejection)."""
    return count_distribution(residual_chain(p, q, draws)[0])


def width_rule(counts: torch.Tensor, threshold: float, min_width: int) -> int:
    """The paper's width rule on P(K = k): the largest w with P(K >= w) >= threshold, within [min_width, draws]."""
    draws = len(counts) - 1
    at_least = counts.flip(0).cumsum(0).flip(0)  # P(K >= w), w = 0..draws
    width = max(w for w in range(draws + 1) if at_least[w] >= threshold - 1e-12)
    return min(draws, max(min_width, width))


def adaptive_width(p: torch.Tensor, q: torch.Tensor, draws: int, threshold: float, min_width: int) -> int:
    return width_rule(accepted_count_distribution(p, q, draws), threshold, min_width)


def sequential_accept(p_drawn: list[float], q_drawn: list[float], t: list[float], n: list[float], width: int,
                      generator: torch.Generator) -> tuple[list[int], int]:
    """Try the draws in order until `width` are accepted: draw j (p and q at it: p_drawn[j], q_drawn[j]) is
    accepted with min(1, p_cur / q), p_cur being p_s = max(0, p - t_s q) / n_s after s rejections in a row
    (p itself after an acceptance; `residual_chain` gives t and n). Returns the accepted draws and the
    final s (the residual p_s is what is left to sample from)."""
    accepted, s = [], 0
    for j, q_x in enumerate(q_drawn):
        if len(accepted) == width:
            break
        u = float(torch.rand((), generator=generator))
        if q_x > 0 and u * q_x < max(0.0, p_drawn[j] - t[s] * q_x) / n[s]:
            accepted.append(j)
            s = 0
        else:
            s += 1
    return accepted, s


@dataclass
class _Beam:
    hyp: Hypothesis
    log_weight: float  # log of the target's joint probability of the beam at the level it was drawn
    row: int  # target cache row its tree hangs from
    node: int  # its node in that row's forest; -1 = the row's pending token
    draft_index: int  # its index among the draft beams of its depth (depth 0: the row)
    key: object = None  # equal for beams holding the same sequence (beams drawn with replacement repeat)


@dataclass
class _Level:
    """One draft beam-sampling step: the draws (parents among the draft beams of the depth above, tokens),
    the draft's joint distribution q they were drawn from, and q at each draw."""

    parents: list[int]
    tokens: list[int]
    q: object  # Joint or GreedyJoint
    q_drawn: list[float]
    keys: list  # per draw: (its parent's key, its token) -- equal for draft beams holding the same sequence


@register("dsbd")
class DynamicWidthSpeculativeBeamDecoding(BeamMethod):
    paper = Paper("Dynamic-Width Speculative Beam Decoding for Efficient LLM Inference", arxiv="2409.16560",
                  venue="AAAI 2025")
    needs = Needs(draft=True)

    @dataclass
    class Config(Settings):
        gamma: int = setting(3, "draft beam-sampling steps per iteration", low=0)
        max_width: int = setting(4, "W: draft draws per step, and target beams kept between iterations", low=1)
        min_width: int = setting(1, "the narrowest width the rule may choose (at most max_width)", low=1)
        width_threshold: float = setting(
            0.7, "the width rule's threshold: the largest w with P(at least w draws accepted) >= it; in (0, 1]",
            low=0.0, high=1.0)
        keep_one_beam: bool = setting(False, "the paper's memory-saving modification: one beam (cache row) "
                                             "survives an iteration")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.min_width > self.max_width:
                raise SettingError(f"min_width must be at most max_width ({self.max_width}); got {self.min_width}")
            if self.width_threshold <= 0:
                raise SettingError(f"width_threshold must be in (0, 1]; got {self.width_threshold}")

    def search(self, ctx: DecodeContext, run: BeamRun) -> None:
        c, vocab = self.config, ctx.target.config.vocab_size
        target, draft = BeamCache(ctx.target), BeamCache(ctx.draft)
        target_pending, draft_pending = [list(ctx.prompt_ids)], [list(ctx.prompt_ids)]
        beams = [_Beam(Hypothesis(), 0.0, 0, -1, 0, 0)]
        done: list[Hypothesis] = []
        widths: list[int] = []
        while True:
            gamma = max(0, min(c.gamma, ctx.max_new_tokens - len(beams[0].hyp.tokens) - 1))
            levels, snapshots = self._draft(ctx, draft, draft_pending, beams, gamma, vocab)
            forest, node_of = _forest(beams, levels)
            logits = target.feed(target_pending, forest)[..., :vocab]
            new, depth, all_accepted = self._verify(ctx, beams, levels, logits, node_of, widths)
            keep = []
            for beam, token in new:
                if finished(beam.hyp, ctx):
                    done.append(cut(beam.hyp, ctx))
                else:
                    keep.append((beam, token))
            run.candidates = by_mean_logprob(done + [beam.hyp for beam, _ in keep])
            run.passed(depth + 1, sum(len(tree) for tree in forest))
            if widths:
                ctx.extras["dsbd_mean_width"] = sum(widths) / len(widths)
            if not keep:
                return
            target, target_pending = self._target_cache(target, forest, keep, len(target_pending[0]))
            draft, draft_pending = self._draft_cache(draft, draft_pending, snapshots, levels, keep, depth,
                                                     all_accepted)
            same = first_of([tuple(b.hyp.tokens) for b, _ in keep])
            beams = [_Beam(b.hyp, b.log_weight, j, -1, j, same[j]) for j, (b, _) in enumerate(keep)]

    # ------------------------------------------------------------ draft: beam sampling, gamma steps

    def _draft(self, ctx, draft: BeamCache, pending, beams, gamma, vocab):
        """One `_Level` per depth i = 1..gamma, and the draft caches after each step (rows = draft beams of
        depth i-1, their own tokens included)."""
        log_weights, keys = [b.log_weight for b in beams], [b.key for b in beams]
        levels, snapshots, cache = [], [], draft
        for i in range(gamma):
            logits = on_target_vocab(cache.feed(pending)[:, -1], vocab)
            snapshots.append(cache)
            q = joint(logits, log_weights, ctx.sampling, first_of(keys))
            parents, tokens = q.draw(self.config.max_width, ctx.generator)
            q_drawn = q.at(parents, tokens)
            keys = [(keys[parent], token) for parent, token in zip(parents, tokens)]
            levels.append(_Level(parents, tokens, q, q_drawn, keys))
            log_weights = [math.log(x) for x in q_drawn]
            if i < gamma - 1:
                cache, pending = cache.select(parents), [[t] for t in tokens]
        return levels, snapshots

    # ------------------------------------------------------------ verification, level by level

    def _verify(self, ctx, beams, levels, logits, node_of, widths):
        """Returns the new beams as (beam, token it adds after its base) pairs, the depth of their bases, and
        whether every level was accepted."""
        c, generator = self.config, ctx.generator
        n_final = 1 if c.keep_one_beam else c.max_width
        valid = beams  # the target's beams at depth i - 1
        for depth, level in enumerate(levels, start=1):
            # p: the target's joint over (valid beam, token); the draft beams no valid beam matches have p = 0
            p, p_logits, p_rows = _target_joint(ctx, valid, logits)
            owner = {b.draft_index: v for v, b in enumerate(valid)}
            q_on_p = level.q.on([b.draft_index for b in valid], p)
            alphas, t, n = residual_chain(p.probs, q_on_p, c.max_width)
            width = width_rule(count_distribution(alphas), c.width_threshold, c.min_width)
            widths.append(width)
            v_of = [owner.get(parent, -1) for parent in level.parents]
            p_drawn = [x if v >= 0 else 0.0 for x, v in zip(p.at([max(v, 0) for v in v_of], level.tokens), v_of)]
            accepted, s = sequential_accept(p_drawn, level.q_drawn, t, n, width, generator)
            if len(accepted) < width:  # stop at this depth: accepted + residual sample + fresh samples of p
                out = [(v_of[j], level.tokens[j]) for j in accepted][:n_final]
                if len(out) < n_final:
                    rest = p.residual(q_on_p, t[s]) if s else p
                    out += zip(*rest.draw(1, generator))
                if len(out) < n_final:
                    out += zip(*p.draw(n_final - len(out), generator))
                return _extend(valid, p, p_logits, p_rows, out), depth - 1, False
            logp = logprobs(p_logits, [p_rows[v_of[j]] for j in accepted], [level.tokens[j] for j in accepted])
            valid = [_Beam(valid[v_of[j]].hyp.extended(level.tokens[j], lp), math.log(p_drawn[j]),
                           valid[v_of[j]].row, node_of[depth - 1][j][1], j, level.keys[j])
                     for j, lp in zip(accepted, logp.tolist())]
        p, p_logits, p_rows = _target_joint(ctx, valid, logits)  # all accepted: W bonus beams from depth gamma + 1
        return _extend(valid, p, p_logits, p_rows, list(zip(*p.draw(n_final, generator)))), len(levels), True

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
            last = levels[-1]
            rows = [last.parents[beam.draft_index] for beam, _ in keep]
            return snapshots[-1].select(rows), [[last.tokens[beam.draft_index], token] for beam, token in keep]
        rows = [beam.draft_index for beam, _ in keep]
        return snapshots[depth].select(rows), [[token] for _, token in keep]


def _target_joint(ctx: DecodeContext, valid: list[_Beam], logits: torch.Tensor):
    """The target's joint over (valid beam, token); the logits of the valid beams' distinct sequences (one
    gather, or a view) and each valid beam's row in them."""
    rows = first_of([b.key for b in valid])
    distinct = sorted(set(rows))
    # column 0 scores what follows a row's pending token, column 1 + k what follows node k
    p_logits = rows_of(logits, [valid[v].row for v in distinct], [1 + valid[v].node for v in distinct])
    p_rows = [distinct.index(r) for r in rows]
    return joint(p_logits, [b.log_weight for b in valid], ctx.sampling, p_rows), p_logits, p_rows


def _extend(valid: list[_Beam], p, p_logits: torch.Tensor, p_rows: list[int], picks) -> list[tuple[_Beam, int]]:
    """New beams from (valid beam, token) picks: the token is added after the beam's base (it becomes pending)."""
    beams, tokens = [v for v, _ in picks], [t for _, t in picks]
    weights, logp = p.at(beams, tokens), logprobs(p_logits, [p_rows[v] for v in beams], tokens).tolist()
    out = []
    for v, token, weight, lp in zip(beams, tokens, weights, logp):
        base = valid[v]
        log_weight = math.log(weight) if weight > 0 else -math.inf
        out.append((_Beam(base.hyp.extended(token, lp), log_weight, base.row, base.node, base.draft_index), token))
    return out


def _forest(beams: list[_Beam], levels: list[_Level]):
    """Each target row's draft tree as (token, parent node) lists, shared prefixes merged; and for every
    draft beam of every depth its (row, node)."""
    forest: list[list[tuple[int, int]]] = [[] for _ in beams]
    index: dict[tuple[int, int, int], int] = {}
    node_of: list[list[tuple[int, int]]] = []
    above = [(b.row, -1) for b in beams]  # depth 0: (row, node) of each draft beam
    for level in levels:
        here = []
        for parent, token in zip(level.parents, level.tokens):
            row, parent_node = above[parent]
            key = (row, parent_node, token)
            if key not in index:
                index[key] = len(forest[row])
                forest[row].append((token, parent_node))
            here.append((row, index[key]))
        node_of.append(here)
        above = here
    return forest, node_of
