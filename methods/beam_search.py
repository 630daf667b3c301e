"""Beam search with K beams: the deterministic reference the beam-speculation papers compare with.

Not lossless: it maximises (length-penalised) sequence log-probability, a different objective from
greedy decoding, so its output differs from `ar`'s by design. The K beams share one batched forward
per step, counted as one target pass. Hypothesis bookkeeping follows transformers' beam search
(top 2K candidates per step, only the top K may finish, length penalty score / length**alpha, the
same early-stop heuristic), so that, given the same settings, the output is the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from methods.base import DecodeContext, Paper, Settings, register, setting
from methods.common import vocab
from methods.common.beams import BeamCache, BeamMethod, BeamRun, Hypothesis

UNREACHABLE = -1.0e9  # transformers' "never choose this" score


@register("beam_search")
class BeamSearch(BeamMethod):
    paper = Paper("Beam search (as in transformers' generate, num_beams=K, do_sample=False)",
                  url="https://github.com/huggingface/transformers")

    @dataclass
    class Config(Settings):
        num_beams: int = setting(4, "beams (K)", low=1)
        length_penalty: float = setting(1.0, "a finished hypothesis scores log-prob / length**length_penalty")
        early_stopping: Literal["false", "true", "never"] = setting(
            "false", "as transformers': false stops when no running beam can beat the K finished ones (its "
            "heuristic), true at K finished hypotheses, never on the exact bound")

    def search(self, ctx: DecodeContext, run: BeamRun) -> None:
        k, alpha = self.config.num_beams, self.config.length_penalty
        early = {"false": False, "true": True, "never": "never"}[self.config.early_stopping]
        keep = max(2, 1 + len(ctx.eos_token_ids)) * k
        cache, pending = BeamCache(ctx.target), [list(ctx.prompt_ids)]
        running, running_scores = [Hypothesis()], torch.zeros(1)
        final: list[tuple[float, Hypothesis | None, bool]] = [(UNREACHABLE, None, False)] * k  # (score, hyp, finished)
        improvable, length = True, 0
        while True:
            logp = torch.log_softmax(cache.feed(pending)[:, -1], -1)
            length += 1  # new tokens in every candidate
            # the top `keep` of all (beam, token) pairs are among each beam's own top `keep`: one batched
            # topk per beam on the device, and only those candidates reach the host
            top_values, top_indices = vocab.top_k(logp, min(keep, logp.shape[-1]))
            scores = (top_values + running_scores.to(logp.device)[:, None]).reshape(-1)
            best = torch.topk(scores, k=min(keep, scores.numel()))
            per_row = top_indices.shape[-1]
            rows = best.indices // per_row
            picked = torch.stack([best.values, rows.to(best.values.dtype),  # ids < 2**24: exact in float32
                                  top_indices.reshape(-1)[best.indices].to(best.values.dtype),
                                  top_values.reshape(-1)[best.indices]]).tolist()
            top_scores = torch.tensor(picked[0])
            parents, tokens = [int(r) for r in picked[1]], [int(t) for t in picked[2]]
            hits = torch.tensor([t in ctx.eos_token_ids or length >= ctx.max_new_tokens for t in tokens])
            candidates = [running[p].extended(t, lp) for p, t, lp in zip(parents, tokens, picked[3])]
            final = self._update_final(final, top_scores, hits, candidates, length, improvable, early)
            # the best K candidates that did not stop become the next running beams
            chosen = torch.topk(top_scores + hits.float() * UNREACHABLE, k=k).indices.tolist()
            running = [candidates[i] for i in chosen]
            running_scores = (top_scores + hits.float() * UNREACHABLE)[chosen]
            done = [(score, hyp) for score, hyp, finished in final if finished and hyp is not None]
            run.candidates = done or list(zip(running_scores.tolist(), running))  # none finished: the running beams
            run.passed()
            all_finished = len(done) == k
            if all_finished:
                best_length = ctx.max_new_tokens if early == "never" and alpha > 0 else length
                worst = min(score for score, _, _ in final)
                improvable = improvable and bool(running_scores[0] / best_length**alpha > worst)
            if not improvable or (all_finished and early is True) or bool(hits.all()):
                return
            cache = cache.select([parents[i] for i in chosen])
            pending = [[candidates[i].tokens[-1]] for i in chosen]

    def _update_final(self, final, top_scores, hits, candidates, length, improvable, early):
        """Merge the top-K candidates that just stopped into the K best finished hypotheses."""
        k, alpha = self.config.num_beams, self.config.length_penalty
        full = all(done for _, _, done in final) and early is True
        merged = list(final)
        for i, (score, hyp) in enumerate(zip(top_scores.tolist(), candidates)):
            just_finished = bool(hits[i]) and i < k
            penalised = torch.tensor(score, dtype=torch.float32) / (length**alpha)
            penalised += UNREACHABLE * (full + (not improvable) + (not just_finished))
            merged.append((float(penalised), hyp, just_finished))
        order = torch.topk(torch.tensor([m[0] for m in merged], dtype=torch.float32), k=k).indices.tolist()
        return [merged[i] for i in order]
