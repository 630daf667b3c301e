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

import math
from dataclasses import dataclass

from methods.base import DecodeContext, Paper, Settings, register, setting
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
)

DSBD_PAPER = Paper("Dynamic-Width Speculative Beam Decoding for Efficient LLM Inference (beam sampling baseline)",
                   arxiv="2409.16560", venue="AAAI 2025")


@register("beam_sampling")
class BeamSampling(BeamMethod):
    paper = DSBD_PAPER

    @dataclass
    class Config(Settings):
        num_beams: int = setting(4, "beams (K): draws per step; DSBD's widest beam-sampling baseline is 4", low=1)

    def search(self, ctx: DecodeContext, run: BeamRun) -> None:
        cache, pending = BeamCache(ctx.target), [list(ctx.prompt_ids)]
        beams, log_weights, done = [Hypothesis()], [0.0], []
        same = [0]  # per beam, the first beam holding the same sequence: draws repeat, their work is done once
        while True:
            logits = cache.feed(pending)[:, -1]
            beam_joint = joint(logits, log_weights, ctx.sampling, same)
            parents, tokens = beam_joint.draw(self.config.num_beams, ctx.generator)
            weights = beam_joint.at(parents, tokens)
            logp = logprobs(logits, [same[p] for p in parents], tokens).tolist()
            same = first_of([(same[p], t) for p, t in zip(parents, tokens)])
            beams = [beams[p].extended(t, lp) for p, t, lp in zip(parents, tokens, logp)]
            log_weights = []
            for beam, weight in zip(beams, weights):
                if finished(beam, ctx):
                    done.append(cut(beam, ctx))
                log_weights.append(-math.inf if finished(beam, ctx) else math.log(weight))  # finished: not extended
            run.candidates = by_mean_logprob(done or [cut(b, ctx) for b in beams])
            run.passed()
            if all(w == -math.inf for w in log_weights):
                return
            cache = cache.select(parents)
            pending = [[t] for t in tokens]
