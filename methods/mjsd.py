"""Multi-token Joint Speculative Decoding (Qin et al.; arXiv 2407.09722, whose final version is
"Optimized Multi-Token Joint Decoding with Auxiliary Model for LLM Inference", ICLR 2025, MTAD).

The draft approximates the joint distribution of the next gamma tokens by beam sampling (W draws per
step from the beams' joint distribution, with replacement) and proposes the most probable final beam.
The target scores it in one pass, and the longest prefix x_1..x_i whose joint likelihood ratio passes,
P_target(x_1..x_i) / Q_draft(x_1..x_i) > tau, is accepted -- the longest passing prefix, even when a
shorter one failed. The next token is then sampled from the target's distribution after that prefix.

Multi-candidate variant (`candidates="tree"`): every beam of every draft step is a candidate; the whole
draft tree is verified with tree attention in the same single pass (methods/common/tree.py); at depth i a
beam passes if P_target(beam) / max over the depth-i beams of Q_draft > tau; the deepest depth with a
passing beam wins, and among its passing beams the one the target finds most likely.

Defaults from the final version's official evaluation: beam width 4, gamma 4, tau 0.5, sampling with
replacement. Probabilities are those the run samples from (temperature/top-k/top-p applied).
Reductions (tested): with gamma 0 each target pass samples one token from the target, i.e. plain
autoregressive sampling (joint decoding of one token is single-token sampling); at temperature 0 the
target's joint probability is 1 on its greedy path and 0 elsewhere, so MJSD reproduces greedy decoding.
Not lossless at temperature > 0: it favours sequences with a high joint likelihood by design.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch

from methods.base import DecodeContext, Method, Needs, Paper, SettingError, Settings, register, setting
from methods.common import vocab
from methods.common.beams import joint
from methods.common.sampling import next_token, on_target_vocab, warp
from methods.common.tree import ROOT, DraftTree, TreeKV, TreeVerifier, row


@dataclass
class _DraftBeam:
    node: int
    log_q: float  # log Q_draft of its tokens (also its beam-sampling weight, up to a constant per step)


@register("mjsd")
class MultiTokenJointSpeculativeDecoding(Method):
    paper = Paper("Multi-Token Joint Speculative Decoding for Accelerating Large Language Model Inference",
                  arxiv="2407.09722")
    needs = Needs(draft=True)
    lossless = False

    @dataclass
    class Config(Settings):
        gamma: int = setting(4, "draft tokens per step (beam-sampling steps)", low=0)
        beam_width: int = setting(4, "draft beams: draws per beam-sampling step", low=1)
        accept_threshold: float = setting(0.5, "tau: a prefix passes if P_target / Q_draft > tau; tau > 0", low=0.0)
        candidates: Literal["best", "tree"] = setting(
            "best", "best: the most probable final beam is verified; tree: every beam, with tree attention")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.accept_threshold <= 0:
                raise SettingError(f"accept_threshold must be > 0; got {self.accept_threshold}")

    def generate(self, ctx: DecodeContext) -> list[int]:
        c = self.config
        verifier, draft = TreeVerifier(ctx), TreeKV(ctx.draft, ctx.prompt_ids)
        while not ctx.done:
            tree, levels, log_q = self._draft(ctx, draft, verifier.room(c.gamma))
            if c.candidates == "tree" or not levels:
                checked, to_draft = tree, {n: n for n in range(len(tree))}
                candidates = levels
            else:  # only the most probable final beam goes to the target
                nodes = tree.path(max(levels[-1], key=lambda b: b.log_q).node)
                checked = DraftTree()
                checked_nodes = checked.add_path([tree.tokens[n] for n in nodes])
                to_draft = dict(zip(checked_nodes, nodes))
                candidates = [[_DraftBeam(node, sum(log_q[n] for n in nodes[: i + 1]))]
                              for i, node in enumerate(checked_nodes)]
            path = verifier.step(checked, lambda t, logits, candidates=candidates: self._rule(ctx, t, logits, candidates))
            draft.commit(tree, [to_draft[n] for n in path], [verifier.pending])
        return ctx.output

    def _draft(self, ctx: DecodeContext, draft: TreeKV, gamma: int):
        """Beam sampling on the draft for `gamma` steps: the tree of every beam, the beams per depth, and
        log q(token | parent) of every node (the draft's sampling distribution)."""
        tree = DraftTree(replacement=True)
        log_q: dict[int, float] = {}
        beams, levels = [_DraftBeam(ROOT, 0.0)], []
        for step in range(gamma):
            # beams on one node are one sequence with one weight: draw from the nodes, each weighted by how
            # many beams it holds (one row per node, not per beam). Step 0 feeds the pending committed
            # tokens (the root's row), later steps the beams' new nodes.
            held = Counter(b.node for b in beams)
            nodes = list(held)
            logits = on_target_vocab(draft.feed(tree, nodes if step else []), ctx.target.config.vocab_size)
            weight = {b.node: b.log_q for b in beams}
            node_joint = joint(logits, [weight[n] + math.log(held[n]) for n in nodes], ctx.sampling)
            rows, tokens = node_joint.draw(self.config.beam_width, ctx.generator)
            beams = []
            for r, token, q in zip(rows, tokens, node_joint.per_beam_at(rows, tokens)):
                node = tree.add(nodes[r], token)
                log_q[node] = math.log(max(q, 1e-300))
                beams.append(_DraftBeam(node, weight[nodes[r]] + log_q[node]))
            levels.append(beams)
        return tree, levels, log_q

    def _rule(self, ctx: DecodeContext, tree: DraftTree, logits: torch.Tensor, candidates) -> tuple[list[int], int]:
        """The joint-likelihood check: (accepted path, next token sampled from the target after it)."""
        log_tau = math.log(self.config.accept_threshold)
        logits = logits[:, : ctx.target.config.vocab_size]
        # the target's probability of every candidate node's token under its parent's row, in one batch
        # (parents come before children, so a sorted list of nodes lets the joint sums run in one pass)
        nodes = sorted({n for depth_beams in candidates for b in depth_beams for n in tree.path(b.node)})
        probs = _token_probs(logits, [row(tree.parents[n]) for n in nodes], [tree.tokens[n] for n in nodes],
                             ctx) if nodes else []
        log_p: dict[int, float] = {ROOT: 0.0}
        for node, prob in zip(nodes, probs):
            log_p[node] = log_p[tree.parents[node]] + (math.log(prob) if prob > 0 else -math.inf)
        end = ROOT
        for depth_beams in candidates:  # depth 1, 2, ...: the deepest passing depth wins
            reference = max(b.log_q for b in depth_beams)
            passing = [b.node for b in depth_beams if log_p[b.node] - reference > log_tau]
            if passing:
                end = max(passing, key=log_p.__getitem__)
        token = next_token(logits[row(end)], ctx.sampling, ctx.generator)
        return tree.path(end), token


def _token_probs(logits: torch.Tensor, rows: list[int], tokens: list[int], ctx: DecodeContext) -> list[float]:
    """The probabilities the run samples from (temperature/top-k/top-p applied) of `tokens[i]` after
    `rows[i]`, over the span of rows named (a view, no gather); greedy: 1 for the argmax token, else 0."""
    low = min(rows)
    block = logits[low : max(rows) + 1]
    at = torch.tensor([r - low for r in rows], device=logits.device)
    wanted = torch.tensor(tokens, device=logits.device)
    if ctx.sampling.greedy:
        return (vocab.argmax(block)[at] == wanted).float().tolist()
    return warp(block, ctx.sampling)[at, wanted].tolist()
