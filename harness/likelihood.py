"""Log-likelihood of a document under the target: what perplexity suites and the lm-eval adapter score.

Two ways to read a document longer than one pass:
- `read_cached`: in chunks on top of the model's KV cache, so a cache policy attached to the model
  (StreamingLLM, InfLLM ...) acts between chunks; chunk 1 is token by token, as StreamingLLM's perplexity
  script evaluates. Without a policy the cache keeps everything: "dense" attention, whose positions run past
  the trained window on a long document (the blow-up StreamingLLM shows).
- `read_sliding`: a strided sliding window, no cache between windows. A pass reads at most `window` tokens and
  scores the token after each one it reads (every row of its logits is used): the first pass scores the
  document's tokens 1..window; each later pass reads the `window` tokens that end just before the last
  token it scores, and scores the `stride` tokens after the previous pass's (the rest of what it reads is
  context). stride = window gives disjoint windows: each token scored once, the first of a window after one
  token of context; over `[prefix] + document` with window = lm-eval's max_length that is exactly what
  lm-evaluation-harness's HF model does for `loglikelihood_rolling` (`get_rolling_token_windows` with
  context_len 1, made disjoint). stride < window is Hugging Face's strided evaluation (more context per
  token, more passes).
Both score every token after the first, in order: a `Reading` (NLL in nats, whether each token was the
argmax, tokens scored per pass). `cached_nll` and `sliding_nll` return the NLLs alone.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from methods.common import kv


@dataclass
class Reading:
    """Every scored token's NLL (nats) and whether it was the model's argmax there, in order; the tokens
    each pass (a window, or a chunk on the cache) scored."""

    nll: list[float] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, block: int = 512) -> int:
        """Score `targets` with one row of logits each, in float32, a block of rows at a time (an 8k-token
        window's full-vocabulary float32 log-softmax would be gigabytes); one pass's worth."""
        for i in range(0, len(targets), block):
            rows, wanted = logits[i:i + block].float(), targets[i:i + block].unsqueeze(-1)
            logp = torch.log_softmax(rows, dim=-1)
            self.nll += (-logp.gather(-1, wanted).squeeze(-1)).tolist()
            self.greedy += (rows.argmax(-1) == wanted.squeeze(-1)).tolist()
        self.windows.append(len(targets))
        return len(targets)

    @property
    def window_loglik(self) -> list[float]:
        """The log-likelihood (nats, <= 0) of the tokens each pass scored."""
        out, at = [], 0
        for n in self.windows:
            out.append(-math.fsum(self.nll[at:at + n]))
            at += n
        return out

    def tail(self, n: int) -> Reading:
        """The last n scored tokens (a continuation after its context); their passes are not kept."""
        return Reading(self.nll[len(self.nll) - n:], self.greedy[len(self.greedy) - n:], [n])


def read_cached(model: torch.nn.Module, ids: list[int], chunk: int,
                progress: Callable[[int], None] | None = None) -> Reading:
    """Feed `ids` in chunks of `chunk` tokens on one growing (or policy-managed) cache."""
    device = model.device
    cache = kv.new_cache(model)
    out = Reading()
    carry: torch.Tensor | None = None  # the last logits of the previous chunk: they predict this chunk's first token
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            piece = torch.tensor([ids[start:start + chunk]], device=device)
            logits = kv.forward(model, cache, input_ids=piece).logits[0]
            rows = logits[:-1] if carry is None else torch.cat((carry, logits[:-1]))
            first = start + 1 if carry is None else start
            scored = out.add(rows, torch.tensor(ids[first:start + piece.shape[1]], device=device))
            carry = logits[-1:]
            if progress:
                progress(scored)
    return out


def read_sliding(model: torch.nn.Module, ids: list[int], window: int, stride: int,
                 progress: Callable[[int], None] | None = None) -> Reading:
    """The strided sliding window of the module docstring; stride is at most the window (disjoint)."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1; got window={window}, stride={stride}")
    stride = min(stride, window)
    device = model.device
    out = Reading()
    scored_to, stop = 1, min(window + 1, len(ids))  # this pass scores ids[scored_to:stop]
    with torch.inference_mode():
        while scored_to < len(ids):
            start = max(0, stop - 1 - window)  # it reads the `window` tokens before its last target
            keep = stop - scored_to  # only the rows that score: the LM head skips the context's
            logits = model(input_ids=torch.tensor([ids[start:stop - 1]], device=device), use_cache=False,
                           logits_to_keep=keep).logits[0]
            scored = out.add(logits[-keep:], torch.tensor(ids[scored_to:stop], device=device))
            if progress:
                progress(scored)
            scored_to, stop = stop, min(stop + stride, len(ids))
    return out


def read_continuation(model: torch.nn.Module, ids: list[int], scored: int, window: int) -> Reading:
    """The last `scored` tokens of `ids` given all before them, as lm-eval's HF model scores a (context,
    continuation) pair: one pass over the `window` tokens before the last one (the context cut from the
    left); a continuation longer than the window is read in disjoint windows."""
    if scored > window:
        return read_sliding(model, ids, window, window).tail(scored)
    tail = ids[-(window + 1):]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tail[:-1]], device=model.device), use_cache=False,
                       logits_to_keep=scored).logits[0]
    out = Reading()
    out.add(logits[-scored:], torch.tensor(tail[-scored:], device=model.device))
    return out


def cached_nll(model: torch.nn.Module, ids: list[int], chunk: int,
               progress: Callable[[int], None] | None = None) -> list[float]:
    return read_cached(model, ids, chunk, progress).nll


def sliding_nll(model: torch.nn.Module, ids: list[int], window: int, stride: int,
                progress: Callable[[int], None] | None = None) -> list[float]:
    return read_sliding(model, ids, window, stride, progress).nll


def prefix_token_id(tokenizer) -> int | None:
    """The token lm-eval puts before a document so that its first token is scored too: BOS, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return None if token is None else int(token)


def count_words(text: str) -> int:
    """Words as lm-eval's wikitext counts them: pieces of a split on whitespace runs, so text that ends (or
    starts) with whitespace counts one more (an empty piece)."""
    return len(re.split(r"\s+", text))


def perplexities(nll: list[float], text: str) -> dict:
    """Token, word and byte perplexity and bits per byte, as lm-evaluation-harness's wikitext task defines
    them: the summed log-likelihood over the scored tokens, the words (`count_words`) and the UTF-8 bytes."""
    return perplexities_of_total(math.fsum(nll), text, len(nll))


def perplexities_of_total(total: float, text: str, scored_tokens: int) -> dict:
    """`perplexities` from the summed NLL (nats) of `text`; no token perplexity when no token was scored on its
    own (a scorer's reading, e.g. byte_level's over every tokenization)."""
    words, size = count_words(text), len(text.encode("utf-8"))
    return {"scored_tokens": scored_tokens, "words": words, "bytes": size,
            "token_perplexity": math.exp(total / scored_tokens) if scored_tokens else None,
            "word_perplexity": math.exp(total / words) if words else None,
            "byte_perplexity": math.exp(total / size) if size else None,
            "bits_per_byte": total / (size * math.log(2)) if size else None}
