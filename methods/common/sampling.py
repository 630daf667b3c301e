"""Turning logits into the distribution a method samples from, the same way for target and draft."""
from __future__ import annotations

import torch

from methods.base import Sampling
from methods.common import vocab


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (rows = positions). Greedy: one-hot argmax."""
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a 1-D distribution, on the CPU generator so runs repeat across devices."""
    return int(torch.multinomial(probs.detach().float().cpu(), 1, generator=generator))


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The token a plain decoder emits from one position's logits."""
    if sampling.greedy:
        return int(logits.argmax(-1))
    return sample(warp(logits, sampling), generator)


def gumbel_top_k(log_probs: torch.Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """k distinct tokens drawn without replacement from softmax(log_probs), in draw order (the order the
    Gumbel-Top-k trick gives, Kool et al., arXiv 1903.06059; drawn by `vocab.sample_distinct`, without a
    full-vocabulary noise vector). generator None: the plain top-k (greedy)."""
    log_probs = log_probs.detach().float()
    if generator is None:
        k = min(k, int(torch.isfinite(log_probs).sum()))
        return vocab.top_k(log_probs, k)[1].tolist()
    return vocab.sample_distinct(log_probs.softmax(-1), k, generator)


def on_target_vocab(x: torch.Tensor, vocab: int, fill: float = float("-inf")) -> torch.Tensor:
    """A draft's logits (fill -inf) or probabilities (fill 0) over the target's `vocab` ids: a larger
    draft vocabulary (padding rows) is cut, a smaller one padded. The one place drafts are aligned."""
    if x.shape[-1] >= vocab:
        return x[..., :vocab]
    return torch.nn.functional.pad(x, (0, vocab - x.shape[-1]), value=fill)
