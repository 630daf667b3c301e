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
from dataclasses import dataclass

import torch

from methods.base import DecodeContext, Method, Needs, Paper, register
from methods.common.beams import draw, joint_probs
from methods.common.sampling import on_target_vocab, sample, warp
from methods.common.tree import ROOT, DraftTree, TreeKV, TreeVerifier, row


@dataclass
class _DraftBeam:
    node: int
    weight: float  # its draft joint probability (normalised per step, as the draws were made)
    log_q: float  # log Q_draft of its tokens


@register("mjsd")
class MultiTokenJointSpeculativeDecoding(Method):
    paper = Paper("Multi-Token Joint Speculative Decoding for Accelerating Large Language Model Inference",
                  arxiv="2407.09722")
    needs = Needs(draft=True)
    lossless = False

    @dataclass
    class Config:
        gamma: int = 4  # draft tokens per step
        beam_width: int = 4  # draft beams (draws per beam-sampling step)
        accept_threshold: float = 0.5  # tau of the joint-likelihood check
        candidates: str = "best"  # "best": the most probable final beam; "tree": every beam, tree attention

    def generate(self, ctx: DecodeContext) -> list[int]:
        c = self.config
        if c.gamma < 0 or c.beam_width < 1 or not 0 < c.accept_threshold or c.candidates not in ("best", "tree"):
            raise ValueError("mjsd needs gamma >= 0, beam_width >= 1, accept_threshold > 0, candidates best|tree")
        self.vocab = ctx.target.config.vocab_size
        verifier, draft = TreeVerifier(ctx), TreeKV(ctx.draft, ctx.prompt_ids)
        while not ctx.done:
            gamma = verifier.room(c.gamma)
            tree, levels = self._draft(ctx, draft, gamma)
            if c.candidates == "tree" or not levels:
                checked, to_draft = tree, {n: n for n in range(len(tree))}
                candidates = levels
            else:  # only the most probable final beam goes to the target
                best = max(levels[-1], key=lambda b: b.weight)
                nodes = tree.path(best.node)
                checked = DraftTree()
                checked_nodes = checked.add_path([tree.tokens[n] for n in nodes])
                to_draft = dict(zip(checked_nodes, nodes))
                candidates = [[_DraftBeam(node, 1.0, sum(self._log_q[n] for n in nodes[: i + 1]))]
                              for i, node in enumerate(checked_nodes)]
            path = verifier.step(checked, lambda t, logits: self._rule(ctx, t, logits, candidates))
            draft.commit(tree, [to_draft[n] for n in path], [verifier.pending])
        return ctx.output

    def _draft(self, ctx: DecodeContext, draft: TreeKV, gamma: int):
        """Beam sampling on the draft for `gamma` steps; the tree of every beam, and the beams per depth."""
        tree = DraftTree(replacement=True)
        self._log_q: dict[int, float] = {}  # node -> log q(token | parent), the draft's sampling distribution
        beams, levels = [_DraftBeam(ROOT, 1.0, 0.0)], []
        for step in range(gamma):
            # step 0 feeds the pending committed tokens (one row: the root), later steps the beams' new nodes
            fresh = list(dict.fromkeys(b.node for b in beams)) if step else []
            logits = on_target_vocab(draft.feed(tree, fresh).float(), self.vocab)
            per_beam = logits[torch.tensor([fresh.index(b.node) for b in beams])] if step else logits[-1:]
            joint = joint_probs(torch.tensor([b.weight for b in beams], dtype=torch.float64), per_beam, ctx.sampling)
            q = warp(per_beam, ctx.sampling)
            picks = draw(joint, self.config.beam_width, ctx.generator)
            nxt = []
            for pick in picks:
                parent, token = divmod(pick, self.vocab)
                beam = beams[parent]
                node = tree.add(beam.node, token)
                self._log_q[node] = math.log(max(float(q[parent, token]), 1e-300))
                nxt.append(_DraftBeam(node, float(joint[pick]), beam.log_q + self._log_q[node]))
            beams = nxt
            levels.append(beams)
        return tree, levels

    def _rule(self, ctx: DecodeContext, tree: DraftTree, logits: torch.Tensor, candidates) -> tuple[list[int], int]:
        """The joint-likelihood check: (accepted path, next token sampled from the target after it)."""
        log_tau = math.log(self.config.accept_threshold)
        target = warp(logits[:, : self.vocab].float(), ctx.sampling)
        log_p: dict[int, float] = {}

        def joint_log_p(node: int) -> float:
            if node not in log_p:
                parent = tree.parents[node]
                prob = float(target[0 if parent == ROOT else row(parent), tree.tokens[node]])
                log_p[node] = (0.0 if parent == ROOT else joint_log_p(parent)) + (math.log(prob) if prob > 0 else -math.inf)
            return log_p[node]

        end = ROOT
        for depth_beams in candidates:  # depth 1, 2, ...: the deepest passing depth wins
            reference = max(b.log_q for b in depth_beams)
            passing = [b.node for b in depth_beams if joint_log_p(b.node) - reference > log_tau]
            if passing:
                end = max(passing, key=joint_log_p)
        token = sample(target[0 if end == ROOT else row(end)], ctx.generator)
        return (tree.path(end) if end != ROOT else []), token
