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

from methods.base import DecodeContext, Paper, SettingError, Settings, register, setting
from methods.common import vocab
from methods.common.beams import BeamCache, BeamMethod, BeamRun, Hypothesis, by_mean_logprob


@register("diverse_beam")
class DiverseBeamSearch(BeamMethod):
    paper = Paper("Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence Models", arxiv="1610.02424")

    @dataclass
    class Config(Settings):
        num_beams: int = setting(4, "beams in all (B)", low=1)
        num_groups: int = setting(4, "groups (G), each with B/G beams; must divide num_beams", low=1)
        diversity_strength: float = setting(0.5, "lambda of the Hamming diversity term", low=0.0)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.num_beams % self.num_groups:
                raise SettingError(f"num_groups must divide num_beams ({self.num_beams}); got {self.num_groups}")

    def search(self, ctx: DecodeContext, run: BeamRun) -> None:
        beams, groups = self.config.num_beams, self.config.num_groups
        per_group = beams // groups
        cache, pending = BeamCache(ctx.target), [list(ctx.prompt_ids)]
        # per group: running (hypothesis, augmented score, cache row) and its best finished (score, hypothesis)
        running = [[(Hypothesis(), 0.0, 0)] for _ in range(groups)]
        final: list[list[tuple[float, Hypothesis]]] = [[] for _ in range(groups)]
        while True:
            logp = torch.log_softmax(cache.feed(pending)[:, -1], -1)
            # a group's best 2B/G candidates are among each row's top 2B/G + B tokens (the earlier groups
            # penalise at most B tokens): one batched topk on the device, the rest on those candidates
            values, tokens = vocab.top_k(logp, min(2 * per_group + beams, logp.shape[-1]))
            values, tokens = values.cpu(), tokens.cpu()
            counts: dict[int, int] = {}  # tokens the earlier groups chose at this step
            for g in range(groups):
                running[g] = self._group_step(ctx, running[g], final[g], values, tokens, counts, per_group)
                for hyp, _, _ in running[g]:
                    counts[hyp.tokens[-1]] = counts.get(hyp.tokens[-1], 0) + 1
            # a group's answer: its best finished hypotheses, or (none yet) its running beams
            run.candidates = by_mean_logprob([h for f, r in zip(final, running) for h in
                                              ([h for _, h in f] or [h for h, _, _ in r])])
            run.passed()
            if all(len(f) >= per_group for f in final) or not any(running):
                return
            rows = [row for group in running for _, _, row in group]
            cache = cache.select(rows)
            pending = [[hyp.tokens[-1]] for group in running for hyp, _, _ in group]
            position = iter(range(len(rows)))
            running = [[(hyp, score, next(position)) for hyp, score, _ in group] for group in running]

    def _group_step(self, ctx, beams, final, values, tokens, counts, per_group):
        """One beam-search step of a group on the diversity-augmented scores; returns its next running beams."""
        rows = [row for _, _, row in beams]
        penalty = torch.tensor([[counts.get(t, 0) for t in tokens[r].tolist()] for r in rows], dtype=torch.float32)
        lam = self.config.diversity_strength
        scores = values[rows] + torch.tensor([s for _, s, _ in beams])[:, None] - lam * penalty
        width = tokens.shape[-1]
        top = torch.topk(scores.reshape(-1), k=min(2 * per_group, scores.numel()))
        nxt = []
        for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            parent, column = index // width, index % width
            token = int(tokens[rows[parent], column])
            hyp = beams[parent][0].extended(token, float(values[rows[parent], column]))
            if token in ctx.eos_token_ids or len(hyp.tokens) >= ctx.max_new_tokens:
                if rank < per_group:  # as in beam search: only a top-ranked candidate may finish
                    final.append((score / len(hyp.tokens), hyp))
                    final.sort(key=lambda pair: -pair[0])
                    del final[per_group:]  # only the group's best B/G are ever answered with
                continue
            if len(nxt) < per_group:
                nxt.append((hyp, score, rows[parent]))
        return nxt
