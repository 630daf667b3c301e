"""Beam search with K beams: the deterministic reference the beam-speculation papers compare with.

Not lossless: it maximises (length-penalised) sequence log-probability, a different objective from
greedy decoding, so its output differs from `ar`'s by design. The K beams share one batched forward
per step, counted as one target pass. Hypothesis bookkeeping follows transformers' beam search
(top 2K candidates per step, only the top K may finish, length penalty score / length**alpha, the
same early-stop heuristic), so that, given the same settings, the output is the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import BudgetExhausted, DecodeContext, Method, Paper, register
from methods.common.beams import BeamCache, Hypothesis, emit_per_pass, report_diversity

UNREACHABLE = -1.0e9  # transformers' "never choose this" score


@register("beam_search")
class BeamSearch(Method):
    paper = Paper("Beam search (as in transformers' generate, num_beams=K, do_sample=False)",
                  url="https://github.com/huggingface/transformers")
    lossless = False

    @dataclass
    class Config:
        num_beams: int = 4
        length_penalty: float = 1.0  # finished score = log-prob / length**length_penalty
        early_stopping: str = "false"  # "false" (heuristic), "true" (stop at K finished) or "never"

    def generate(self, ctx: DecodeContext) -> list[int]:
        k, alpha = self.config.num_beams, self.config.length_penalty
        early = {"false": False, "true": True, "never": "never"}.get(str(self.config.early_stopping).lower())
        if k < 1 or early is None:
            raise ValueError("beam_search needs num_beams >= 1 and early_stopping in false/true/never")
        keep = max(2, 1 + len(ctx.eos_token_ids)) * k
        cache, pending = BeamCache(ctx.target), [list(ctx.prompt_ids)]
        running, running_scores = [Hypothesis()], torch.zeros(1)
        final: list[tuple[float, Hypothesis | None, bool]] = [(UNREACHABLE, None, False)] * k  # (score, hyp, finished)
        improvable, steps = True, 0
        try:
            while True:
                logits = cache.feed(pending)[:, -1]
                steps += 1
                logp = torch.log_softmax(logits, -1).cpu()
                vocab = logp.shape[-1]
                scores = (logp + running_scores[:, None]).reshape(-1)
                top_scores, top_index = torch.topk(scores, k=min(keep, scores.numel()))
                parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
                length = steps  # new tokens in every candidate
                hits = torch.tensor([t in ctx.eos_token_ids or length >= ctx.max_new_tokens for t in tokens])
                candidates = [running[p].extended(t, float(logp[p, t])) for p, t in zip(parents, tokens)]
                final = self._update_final(final, top_scores, hits, candidates, length, improvable, early)
                # the best K candidates that did not stop become the next running beams
                chosen = torch.topk(top_scores + hits.float() * UNREACHABLE, k=k).indices.tolist()
                running = [candidates[i] for i in chosen]
                running_scores = (top_scores + hits.float() * UNREACHABLE)[chosen]
                all_finished = all(done for _, _, done in final)
                if all_finished:
                    best_length = ctx.max_new_tokens if early == "never" and alpha > 0 else length
                    worst = min(score for score, _, _ in final)
                    improvable = improvable and bool(running_scores[0] / best_length**alpha > worst)
                if not improvable or (all_finished and early is True) or bool(hits.all()):
                    break
                cache = cache.select([parents[i] for i in chosen])
                pending = [[candidates[i].tokens[-1]] for i in chosen]
        except BudgetExhausted:
            self._finish(ctx, final, running, steps)
            raise
        self._finish(ctx, final, running, steps)
        return ctx.output

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

    @staticmethod
    def _finish(ctx: DecodeContext, final, running, steps: int) -> None:
        done = [(score, hyp) for score, hyp, finished in final if finished and hyp is not None]
        best = max(done, key=lambda pair: pair[0])[1] if done else running[0]  # a budget stop: the best running beam
        report_diversity(ctx, [hyp for _, hyp in done] or running)
        emit_per_pass(ctx, best.tokens, [1] * steps)
