"""Superposed Decoding: k drafts from one autoregressive pass per token (lossy).

The first pass gives the prompt's next-token distribution; the k drafts start with its top-k tokens.
Every later pass feeds ONE input: the superposition of the k drafts' last-token embeddings, weighted
by the drafts' normalised probabilities. The single distribution it returns extends every draft with
its top-k tokens (k x k candidates); each candidate is scored by its draft's score plus the geometric
interpolation (1 - alpha) log p_model + alpha log p_ngram, where p_ngram interpolates n-gram models
(bigram to 6-gram) of a corpus (the `corpus` setting's file, else the texts the harness gives: the
prompts; built once, kept in `ctx.state` across prompts) over the draft's own tokens; a draft the n-gram models know
nothing about gets the model term minus a fixed penalty instead. The k best candidates go on; one that
ends with EOS is set aside as finished; decoding stops once k drafts have finished (beam search's early
stopping: the paper generates fixed lengths and is silent on EOS, so this is our choice).

Not lossless: the output is the best of the final drafts by mean log score per token (finished ones
included) and all k drafts go into the record (`alternatives`); the harness measures the output's
perplexity under the target. Deterministic: the sampling settings are not used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.base import DecodeContext, Method, Paper, SettingError, Settings, register, setting
from methods.common import vocab
from methods.common.kv import forward, new_cache
from methods.common.ngram import NGramTable, check_corpus, corpus_sequences

NGRAM_ORDERS = (2, 3, 4, 5, 6)


@dataclass
class Draft:
    tokens: list[int]
    score: float  # sum of interpolated log probabilities


def ngram_prob(models: dict[int, NGramTable], context: list[int], token: int) -> float | None:
    """Equal-weight interpolation of the orders whose context occurs in the corpus; None if none does."""
    probs = [models[n].prob(context, token) for n in models if len(context) >= n - 1 and models[n].next_counts(context)]
    return sum(probs) / len(probs) if probs else None


@register("superposed")
class SuperposedDecoding(Method):
    paper = Paper("Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass",
                  arxiv="2405.18400", venue="NeurIPS 2024")
    lossless = False

    stateful = True

    @dataclass
    class Config(Settings):
        k: int = setting(3, "drafts (the paper's main setting)", low=1)
        alpha: float = setting(0.5, "n-gram weight in the geometric interpolation, below 1: ours (the paper tunes "
                                    "it per model)", low=0.0, high=1.0)
        penalty: float = setting(200.0, "log-score penalty of a draft the n-gram models cannot score (the release's)",
                                 low=0.0)
        corpus: str = setting("", "text or .jsonl file for the n-gram models; empty: the texts the harness gives "
                                  "(the prompts)")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.alpha >= 1.0:
                raise SettingError(f"alpha must be below 1 (the model's term must count); got {self.alpha!r}")
            check_corpus(self.corpus)

    def models(self, ctx: DecodeContext) -> dict[int, NGramTable]:
        """The n-gram models of the corpus, kept in ctx.state across prompts (built on first use)."""
        models = ctx.state.get("ngram_models")
        if models is None:
            models = ctx.state["ngram_models"] = {n: NGramTable(n) for n in NGRAM_ORDERS}
            for seq in corpus_sequences(ctx, self.config.corpus):
                for table in models.values():
                    table.add(seq)
        return models

    def generate(self, ctx: DecodeContext) -> list[int]:
        cfg = self.config
        models = self.models(ctx)
        model, cache = ctx.target, new_cache(ctx.target)
        vocab = model.config.vocab_size
        embed = model.get_input_embeddings()
        ids = torch.tensor([ctx.prompt_ids], dtype=torch.long, device=model.device)
        logits = forward(model, cache, input_ids=ids, logits_to_keep=1).logits[0, -1]
        passes = 1
        alive, finished = self._extend(ctx, [Draft([], 0.0)], logits[:vocab], models)
        while alive and len(finished) < cfg.k and len(alive[0].tokens) < ctx.max_new_tokens:
            weights = torch.softmax(torch.tensor([d.score for d in alive]), 0).to(model.device)
            last = torch.tensor([d.tokens[-1] for d in alive], dtype=torch.long, device=model.device)
            # the rows of the embedding table, read as a lookup: calling the module outside a pass would be
            # model work the harness cannot attribute (Llama/Qwen embed without scaling)
            with torch.inference_mode():
                superposed = (weights[:, None] * embed.weight[last].float()).sum(0).to(embed.weight.dtype)
            logits = forward(model, cache, inputs_embeds=superposed[None, None], logits_to_keep=1).logits[0, -1]
            passes += 1
            alive, done = self._extend(ctx, alive, logits[:vocab], models)
            finished += done
        ranked = sorted(alive + finished, key=lambda d: -d.score / max(len(d.tokens), 1))[: cfg.k]
        ctx.alternatives = [d.tokens for d in ranked]
        ctx.emit(ranked[0].tokens, record_step=False)
        for i in range(passes):  # one token per pass along the chosen draft; later passes added none to it
            ctx.trace.step(0, 1 if i < len(ctx.output) else 0)
        return ctx.output

    def _extend(self, ctx: DecodeContext, drafts: list[Draft], logits: torch.Tensor,
                models: dict[int, NGramTable]) -> tuple[list[Draft], list[Draft]]:
        """The k best of the k x k extensions of `drafts` by the top-k tokens: (alive, finished with EOS)."""
        cfg = self.config
        logits = logits.float()
        top = vocab.top_k(logits, cfg.k)[1].tolist()
        top_log_p = (logits[top] - torch.logsumexp(logits, -1)).tolist()  # log-softmax of the top k only
        candidates = []
        for draft in drafts:
            context = ctx.prompt_ids + draft.tokens
            scored = []
            for lp, tok in zip(top_log_p, top):
                q = ngram_prob(models, context, tok)
                scored.append((tok, lp, None if not q else math.log(q)))
            known = cfg.alpha > 0 and any(q is not None for _, _, q in scored)
            for tok, lp, lq in scored:
                if known:
                    if lq is None:
                        continue  # zero n-gram probability: log 0, never kept
                    step = (1 - cfg.alpha) * lp + cfg.alpha * lq
                else:
                    step = (1 - cfg.alpha) * lp - cfg.penalty
                candidates.append(Draft(draft.tokens + [tok], draft.score + step))
        candidates.sort(key=lambda d: -d.score)
        alive = [d for d in candidates if d.tokens[-1] not in ctx.eos_token_ids][: cfg.k]
        finished = [d for d in candidates[: cfg.k] if d.tokens[-1] in ctx.eos_token_ids]
        return alive, finished
