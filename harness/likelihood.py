"""Log-likelihood of a document under the target: what perplexity suites score.

Two ways to read a document longer than one pass:
- `cached_nll`: in chunks on top of the model's KV cache, so a cache policy attached to the model
  (StreamingLLM, InfLLM ...) acts between chunks; chunk 1 is token by token, as StreamingLLM's perplexity
  script evaluates. Without a policy the cache keeps everything: "dense" attention, whose positions run past
  the trained window on a long document (the blow-up StreamingLLM shows).
- `sliding_nll`: Hugging Face's strided sliding window, no cache between windows: each window of `window`
  tokens scores its last `stride` tokens (the first window all of its own), with the rest as context; stride =
  window gives disjoint windows, each token scored once with no overlapping context, as lm-evaluation-harness's
  `loglikelihood_rolling` does.
Both return the negative log-likelihood (nats) of every token after the first, in order.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from methods.common import kv


def _nll(logits: torch.Tensor, targets: torch.Tensor, block: int = 512) -> list[float]:
    """-log p(target) for each row, in float32 (one row of logits per target), a block of rows at a time
    (an 8k-token window's full-vocabulary float32 log-softmax would be gigabytes)."""
    out: list[float] = []
    for i in range(0, len(targets), block):
        logp = torch.log_softmax(logits[i:i + block].float(), dim=-1)
        out += (-logp.gather(-1, targets[i:i + block].unsqueeze(-1)).squeeze(-1)).tolist()
    return out


def cached_nll(model: torch.nn.Module, ids: list[int], chunk: int,
               progress: Callable[[int], None] | None = None) -> list[float]:
    """Feed `ids` in chunks of `chunk` tokens on one growing (or policy-managed) cache."""
    device = model.device
    cache = kv.new_cache(model)
    out: list[float] = []
    carry: torch.Tensor | None = None  # the last logits of the previous chunk: they predict this chunk's first token
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            piece = torch.tensor([ids[start:start + chunk]], device=device)
            logits = kv.forward(model, cache, input_ids=piece).logits[0]
            rows = logits[:-1] if carry is None else torch.cat((carry, logits[:-1]))
            first = start + 1 if carry is None else start
            out += _nll(rows, torch.tensor(ids[first:start + piece.shape[1]], device=device))
            carry = logits[-1:]
            if progress:
                progress(piece.shape[1])
    return out


def sliding_nll(model: torch.nn.Module, ids: list[int], window: int, stride: int,
                progress: Callable[[int], None] | None = None) -> list[float]:
    """Hugging Face's strided evaluation, no cache kept between windows: the first window scores its tokens
    after the first; each later one reads `window` tokens ending `stride` tokens further and scores those.
    A token needs the one before it as context, so a later window scores at most window - 1 new tokens:
    stride >= window gives disjoint windows with one token of context each, lm-eval's rolling windows."""
    if window < 2 or stride < 1:
        raise ValueError(f"window must be >= 2 and stride >= 1; got window={window}, stride={stride}")
    device = model.device
    out: list[float] = []
    scored_to, end = 1, min(window, len(ids))  # tokens before scored_to are scored (the first never is)
    with torch.inference_mode():
        while scored_to < len(ids):
            start = max(0, end - window)
            keep = end - scored_to + 1  # only the rows that score: the LM head skips the context's
            logits = model(input_ids=torch.tensor([ids[start:end]], device=device), use_cache=False,
                           logits_to_keep=keep).logits[0]
            rows = logits[:-1]  # the logits of token i come from the row of token i - 1
            out += _nll(rows, torch.tensor(ids[scored_to:end], device=device))
            if progress:
                progress(end - scored_to)
            scored_to, end = end, min(end + min(stride, window - 1), len(ids))
    return out


def perplexities(nll: list[float], text: str) -> dict:
    """Token, word and byte perplexity and bits per byte, as lm-evaluation-harness's wikitext task defines
    them: the summed log-likelihood over the scored tokens, the whitespace-split words and the UTF-8 bytes."""
    total = sum(nll)
    words, size = len(text.split()), len(text.encode("utf-8"))
    return {"scored_tokens": len(nll), "words": words, "bytes": size,
            "token_perplexity": math.exp(total / len(nll)) if nll else None,
            "word_perplexity": math.exp(total / words) if words else None,
            "byte_perplexity": math.exp(total / size) if size else None,
            "bits_per_byte": total / (size * math.log(2)) if size else None}
