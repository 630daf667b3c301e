"""SWIFT: the target drafts for itself with a searched set of attention/MLP sublayers skipped.

Two phases, as in the paper: while decoding, each step also scores one candidate skip set by its
"matchness" (how often the skipped model, run in one parallel pass over the first generated tokens
after the prompt's cached keys/values, predicts the token that was actually generated); candidates come
from random search, with a Bayesian-optimisation proposal every `bayes_interval`-th iteration; a
better-scoring set replaces the current one. The search stops once matchness passes `max_score`, after
`max_tolerance_iter` iterations without improvement, or after `max_opt_iter` iterations; then only the
acceleration phase runs. Drafting stops when the draft's confidence in its token falls below
`stop_threshold`. Dynamic verification (on by default, as in the release): beside each draft token
the tree also holds the draft's next-best alternatives at that position, more of them the less
confident the draft was (the release's 3/5/8/10 under greedy, 1/3/5/10 under sampling, for confidence
above 0.95/0.8/0.5/else; sampled alternatives are further draws without replacement from the draft's
q), and the target verifies the tree in one pass. The search state lives in `ctx.state`, so (as in the
paper's evaluation) it carries over from one prompt to the next within a run.
"""
from __future__ import annotations

import io
from contextlib import redirect_stdout
from dataclasses import dataclass

import numpy as np
import torch

from methods.base import DecodeContext, Method, Paper, SettingError, Settings, register, setting
from methods.common import vocab
from methods.common.layerskip import (
    SkipSet,
    decoder_layers,
    draft_chain,
    prefix_view,
    skipped_forward,
)
from methods.common.sampling import argmax
from methods.common.speculation import ChainVerifier
from methods.common.tree import ROOT, DraftTree, TreeVerifier

# Tree candidates per draft position by the draft's confidence (above 0.95, 0.8, 0.5, else): the release's.
CANDIDATES = {"greedy": (3, 5, 8, 10), "sampled": (1, 3, 5, 10)}
CONFIDENCE_STEPS = (0.95, 0.8, 0.5)


def candidate_count(confidence: float, greedy: bool) -> int:
    counts = CANDIDATES["greedy" if greedy else "sampled"]
    for step, count in zip(CONFIDENCE_STEPS, counts):
        if confidence > step:
            return count
    return counts[-1]


def dynamic_tree(ctx: DecodeContext, drafts: list[int], rows: list[torch.Tensor], confidence: list[float]) -> DraftTree:
    """The draft chain plus, at every position, the draft's next alternatives as leaves beside it. `rows`
    as `draft_chain` returns them: the logits under greedy, the q each draft was drawn from under sampling."""
    greedy = ctx.sampling.greedy
    tree = DraftTree(replacement=False)
    parent = ROOT
    for token, row, conf in zip(drafts, rows, confidence):
        if not greedy:
            tree.set_dist(parent, row)
        node = tree.add(parent, token)  # the chain's token is the first draw
        for alt in _alternatives(ctx, token, row, candidate_count(conf, greedy) - 1):
            tree.add(parent, alt)
        parent = node
    return tree


def _alternatives(ctx: DecodeContext, token: int, row: torch.Tensor, count: int) -> list[int]:
    """Greedy: the next `count` most likely tokens. Sampling: `count` further draws without replacement."""
    if count <= 0:
        return []
    if ctx.sampling.greedy:
        return [t for t in vocab.top_k(row, count + 1)[1].tolist() if t != token][:count]
    # further draws without replacement after the chain's token (the first draw); fewer if no mass is left
    return vocab.sample_distinct(row, count + 1, ctx.generator, drawn=[token])[1:]


@register("swift")
class Swift(Method):
    paper = Paper("SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration", arxiv="2410.06916",
                  venue="ICLR 2025")
    lossless = True
    stateful = True

    @dataclass
    class Config(Settings):  # the official release's defaults
        skip_ratio: float = setting(0.45, "share of the 2 x (layers - 2) middle sublayers skipped (below 1)",
                                    low=0.0, high=1.0)
        stop_threshold: float = setting(0.8, "drafting stops below this draft confidence", low=0.0, high=1.0)
        max_draft: int = setting(25, "draft tokens per step at most", low=1)
        context_window: int = setting(32, "generated tokens the matchness is scored on (search starts after them)",
                                      low=1)
        opt_interval: int = setting(1, "decoding steps between search iterations", low=1)
        bayes_interval: int = setting(25, "every n-th search iteration is a Bayesian-optimisation proposal", low=1)
        max_opt_iter: int = setting(1000, "search iterations at most", low=0)
        max_tolerance_iter: int = setting(300, "search iterations without improvement before it stops", low=0)
        max_score: float = setting(0.95, "matchness that ends the search", low=0.0, high=1.0)
        optimization: bool = setting(True, "search the skip set while decoding (off: the release's starting set)")
        bayes: bool = setting(True, "mix Bayesian-optimisation proposals into the random search")
        dynamic_verification: bool = setting(True, "verify the draft's alternatives too, as a tree")
        seed: int = setting(0, "random search and the Bayesian optimiser (the release seeds the optimiser with 1)",
                            low=0)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.skip_ratio >= 1.0:
                raise SettingError(f"skip_ratio must be below 1 (some sublayers must run); got {self.skip_ratio!r}")

    def search(self, ctx: DecodeContext) -> LayerSetSearch:
        """The layer-set search, kept in ctx.state across prompts (built on first use)."""
        search = ctx.state.get("layer_set_search")
        layers = len(decoder_layers(ctx.target))
        if search is None or search.layers != layers:
            search = ctx.state["layer_set_search"] = LayerSetSearch(layers, self.config)
        return search

    def generate(self, ctx: DecodeContext) -> list[int]:
        cfg = self.config
        search = self.search(ctx)
        tree_mode = cfg.dynamic_verification
        verifier = TreeVerifier(ctx) if tree_mode else ChainVerifier(ctx)
        cache = verifier.kv.cache if tree_mode else verifier.cache
        verifier.step(DraftTree() if tree_mode else [])  # prefill alone: the draft reuses the prompt's KV
        step = 0
        while not ctx.done:
            k = verifier.room(cfg.max_draft)
            drafts, rows, confidence = [], [], []
            if k:
                drafts, rows, confidence = draft_chain(ctx, cache, verifier.pending, search.current, k,
                                                       cfg.stop_threshold, keep_logits=tree_mode)
            if tree_mode:
                verifier.step(dynamic_tree(ctx, drafts, rows, confidence) if drafts else DraftTree())
            else:
                verifier.step(drafts, torch.stack(rows) if rows and not ctx.sampling.greedy else None)
            if search.active and len(ctx.output) > cfg.context_window + 1 and step % cfg.opt_interval == 0:
                candidate = search.propose()
                search.observe(candidate, self._matchness(ctx, cache, candidate))
            step += 1
        ctx.extras.update({
            "swift_search_iterations": float(search.iterations),
            "swift_best_matchness": float(search.best_score),
        })
        return ctx.output

    def _matchness(self, ctx: DecodeContext, cache, skip: SkipSet) -> float:
        """Share of the first generated tokens the skipped model predicts, in one parallel pass after the
        prompt's keys and values (a view: the target's cache is left as it is)."""
        window = ctx.output[: self.config.context_window + 1]
        logits = skipped_forward(ctx.target, window, prefix_view(cache, len(ctx.prompt_ids)), skip, keep=None)
        guesses = argmax(logits[:-1, : ctx.target.config.vocab_size])
        return float(np.mean([g == t for g, t in zip(guesses, window[1:])]))


class LayerSetSearch:
    """Random search plus Bayesian optimisation over which middle sublayers to skip (first and last
    layer always run). A point has one coordinate in [0, 1] per middle sublayer, attention ones first;
    a proposal skips the `count` sublayers with the largest coordinates."""

    def __init__(self, layers: int, cfg: Swift.Config) -> None:
        self.layers, self.cfg = layers, cfg
        self.middle = max(layers - 2, 0)
        self.count = int(self.middle * 2 * cfg.skip_ratio)
        every_other = range(1, layers - 1, 2)  # the release's starting set
        self.current = SkipSet.of(every_other, every_other)
        self.best_score = 0.0
        self.iterations = self.tolerance = 0
        self.active = cfg.optimization and self.middle > 0 and self.count > 0
        self.rng = np.random.default_rng(cfg.seed)
        self._optimizer = None
        self._pending_point: dict[str, float] | None = None

    def _point(self, skip: SkipSet) -> dict[str, float]:
        values = [float(i + 1 in skip.attention) for i in range(self.middle)]
        values += [float(i + 1 in skip.mlp) for i in range(self.middle)]
        return {f"x{j}": v for j, v in enumerate(values)}

    def _skip_set(self, slots) -> SkipSet:
        slots = [int(s) for s in slots]
        return SkipSet.of([s + 1 for s in slots if s < self.middle], [s - self.middle + 1 for s in slots if s >= self.middle])

    def propose(self) -> SkipSet:
        if self.cfg.bayes and (self.iterations + 1) % self.cfg.bayes_interval == 0:
            point = self.optimizer.suggest()
            order = sorted(point, key=lambda name: -point[name])[: self.count]
            candidate = self._skip_set(int(name[1:]) for name in order)
        else:
            candidate = self._skip_set(self.rng.choice(2 * self.middle, self.count, replace=False))
            point = self._point(candidate)
        self._pending_point = point
        return candidate

    def observe(self, candidate: SkipSet, score: float) -> None:
        if self.cfg.bayes:
            with redirect_stdout(io.StringIO()):  # bayes_opt prints a line for every repeated point
                self.optimizer.register(params=self._pending_point, target=score)
        if score > self.best_score:
            self.current, self.best_score, self.tolerance = candidate, score, 0
            if score > self.cfg.max_score:
                self.active = False
        else:
            self.tolerance += 1
        self.iterations += 1
        if self.tolerance > self.cfg.max_tolerance_iter or self.iterations > self.cfg.max_opt_iter:
            self.active = False

    @property
    def optimizer(self):
        if self._optimizer is None:
            from bayes_opt import BayesianOptimization, acquisition

            bounds = {f"x{j}": (0.0, 1.0) for j in range(2 * self.middle)}
            self._optimizer = BayesianOptimization(
                f=None, pbounds=bounds, acquisition_function=acquisition.UpperConfidenceBound(kappa=2.5),
                random_state=self.cfg.seed + 1, verbose=0, allow_duplicate_points=True)
            self._optimizer.set_gp_params(alpha=1e-2)  # the release's GP noise
        return self._optimizer

    def __repr__(self) -> str:
        return (f"LayerSetSearch(attention={sorted(self.current.attention)}, mlp={sorted(self.current.mlp)}, "
                f"score={self.best_score:.3f}, iterations={self.iterations}, active={self.active})")

