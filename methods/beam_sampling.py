"""Beam sampling with K beams: the stochastic reference DSBD compares against (its section on beam
sampling; the official code's baseline samples the K next beams from the beams' joint distribution).

Each step draws K (beam, token) pairs i.i.d. from weight(beam) x p(token | beam), p being the target's
distribution after the run's temperature/top-k/top-p; a beam's weight is the probability of its sequence
under those distributions. A drawn pair ending in end-of-sequence is a finished candidate; the search
stops when all K drawn beams have finished or max_new_tokens is reached, and the output is the candidate
with the best length-normalised log-probability under the target (the lowest perplexity).

Choices where the paper leaves room: top-k/top-p are applied per beam, before weighting (with one beam
this is exactly the run's sampling, which makes K=1 plain sampling and DSBD with width 1 speculative
sampling); at temperature 0 every draw is the argmax, so beam sampling degenerates to greedy decoding.
Not lossless: it samples sequences in proportion to their joint probability, not token by token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import BudgetExhausted, DecodeContext, Method, Paper, register
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

DSBD_PAPER = Paper("Dynamic-Width Speculative Beam Decoding for Efficient LLM Inference (beam sampling baseline)",
                   arxiv="2409.16560", venue="AAAI 2025")


@register("beam_sampling")
class BeamSampling(Method):
    paper = DSBD_PAPER
    lossless = False

    @dataclass
    class Config:
        num_beams: int = 4  # the widest beam-sampling baseline in DSBD's experiments (2, 3, 4)

    def generate(self, ctx: DecodeContext) -> list[int]:
        k = self.config.num_beams
        if k < 1:
            raise ValueError("beam_sampling needs num_beams >= 1")
        cache, pending = BeamCache(ctx.target), [list(ctx.prompt_ids)]
        beams, weights, done, steps = [Hypothesis()], torch.ones(1), [], 0
        try:
            while True:
                logits = cache.feed(pending)[:, -1]
                steps += 1
                logp = torch.log_softmax(logits, -1).cpu()
                joint = joint_probs(weights, logits, ctx.sampling).cpu()
                picks = draw(joint, k, ctx.generator)
                vocab = logits.shape[-1]
                parents, tokens = [i // vocab for i in picks], [i % vocab for i in picks]
                beams = [beams[p].extended(t, float(logp[p, t])) for p, t in zip(parents, tokens)]
                weights = joint[torch.tensor(picks)]
                for i, beam in enumerate(beams):
                    if finished(beam, ctx):
                        done.append(cut(beam, ctx))
                        weights[i] = 0.0  # a finished beam is not extended
                if bool((weights == 0).all()):
                    break
                cache = cache.select(parents)
                pending = [[t] for t in tokens]
        except BudgetExhausted:
            self._finish(ctx, done, beams, steps)
            raise
        self._finish(ctx, done, beams, steps)
        return ctx.output

    @staticmethod
    def _finish(ctx: DecodeContext, done: list[Hypothesis], beams: list[Hypothesis], steps: int) -> None:
        pool = done or [cut(b, ctx) for b in beams]  # a budget stop: the live beams so far
        report_diversity(ctx, [cut(b, ctx) for b in beams])
        emit_per_pass(ctx, best_by_mean_logprob(pool).tokens, [1] * steps)
