"""Diverse Beam Search (Vijayakumar et al.): the B beams are split into G groups that advance in turn at
every step; group g's beam search maximises log-probability minus lambda x (how many times the earlier
groups chose each token at this step) -- the Hamming diversity term. All groups' beams share one
batched target pass per step.

Defaults: B = 4 beams in G = 4 groups (G = B, the setting the paper finds most diverse) and lambda 0.5
(the paper reports lambda in [0.2, 0.8] working well). Choices where the paper leaves room: a group's
hypothesis finishes on end-of-sequence (scored by its diversity-augmented log-probability / length), the
search stops when every group has B/G finished hypotheses or at max_new_tokens, and the single output is
the final hypothesis with the best length-normalised log-probability under the target. The distinct-1/-2
ratio across all final hypotheses goes into the record (extras). Not lossless: a different objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import BudgetExhausted, DecodeContext, Method, Paper, register
from methods.common.beams import (
    BeamCache,
    Hypothesis,
    best_by_mean_logprob,
    emit_per_pass,
    report_diversity,
)


@register("diverse_beam")
class DiverseBeamSearch(Method):
    paper = Paper("Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence Models", arxiv="1610.02424")
    lossless = False

    @dataclass
    class Config:
        num_beams: int = 4
        num_groups: int = 4
        diversity_strength: float = 0.5  # lambda of the Hamming diversity term

    def generate(self, ctx: DecodeContext) -> list[int]:
        beams, groups, lam = self.config.num_beams, self.config.num_groups, self.config.diversity_strength
        if groups < 1 or beams % groups:
            raise ValueError("diverse_beam needs num_groups >= 1 dividing num_beams")
        per_group = beams // groups
        cache, pending = BeamCache(ctx.target), [list(ctx.prompt_ids)]
        # per group: running (hypothesis, augmented score, cache row) and finished (score, hypothesis)
        running = [[(Hypothesis(), 0.0, 0)] for _ in range(groups)]
        final: list[list[tuple[float, Hypothesis]]] = [[] for _ in range(groups)]
        steps = 0
        try:
            while True:
                logp = torch.log_softmax(cache.feed(pending)[:, -1], -1).cpu()
                steps += 1
                counts = torch.zeros(logp.shape[-1])  # tokens the earlier groups chose at this step
                for g in range(groups):
                    running[g] = self._group_step(ctx, running[g], final[g], logp, counts, lam, per_group)
                    for hyp, _, _ in running[g]:
                        counts[hyp.tokens[-1]] += 1
                if all(len(f) >= per_group for f in final) or not any(running):
                    break
                rows = [row for group in running for _, _, row in group]
                cache = cache.select(rows)
                pending = [[hyp.tokens[-1]] for group in running for hyp, _, _ in group]
                position = iter(range(len(rows)))
                running = [[(hyp, score, next(position)) for hyp, score, _ in group] for group in running]
        except BudgetExhausted:
            self._finish(ctx, final, running, per_group, steps)
            raise
        self._finish(ctx, final, running, per_group, steps)
        return ctx.output

    @staticmethod
    def _group_step(ctx, beams, final, logp, counts, lam, per_group):
        """One beam-search step of a group on the diversity-augmented scores; returns its next running beams."""
        rows = [row for _, _, row in beams]
        scores = logp[rows] + torch.tensor([s for _, s, _ in beams])[:, None] - lam * counts[None, :]
        vocab = logp.shape[-1]
        top = torch.topk(scores.reshape(-1), k=min(2 * per_group, scores.numel()))
        nxt = []
        for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            parent, token = index // vocab, index % vocab
            hyp = beams[parent][0].extended(token, float(logp[rows[parent], token]))
            if token in ctx.eos_token_ids or len(hyp.tokens) >= ctx.max_new_tokens:
                if rank < per_group:  # as in beam search: only a top-ranked candidate may finish
                    final.append((score / len(hyp.tokens), hyp))
                continue
            if len(nxt) < per_group:
                nxt.append((hyp, score, rows[parent]))
        return nxt

    @staticmethod
    def _finish(ctx, final, running, per_group, steps) -> None:
        hypotheses = []
        for group_final, group_running in zip(final, running):
            kept = [h for _, h in sorted(group_final, key=lambda pair: -pair[0])[:per_group]]
            hypotheses += kept or [h for h, _, _ in group_running]  # a budget stop: the running beams
        report_diversity(ctx, hypotheses)
        emit_per_pass(ctx, best_by_mean_logprob(hypotheses).tokens, [1] * steps)
