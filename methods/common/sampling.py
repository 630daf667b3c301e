"""Turning logits into the distribution a method samples from, the same way for target and draft."""
from __future__ import annotations

import numpy as np
import torch

from methods.base import Sampling
from methods.common import vocab


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (rows = positions). Greedy: one-hot argmax."""
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if sampling.temperature != 1.0:  # one pass over the vocabulary fewer at the usual temperature 1
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


# Vocabulary block of the two-level sampler: about sqrt(151,936), so both levels stay short.
_BLOCK = 512


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a 1-D distribution (weights need not sum to 1), on the CPU generator so runs repeat
    across devices. Two-level inverse CDF: a block of `_BLOCK` tokens by its mass, then a token within it,
    so only the block masses and one block come to the host (torch.multinomial over a 151,936-entry
    vocabulary takes ~7 ms on a CPU, this ~0.2 ms). The cumulative sums are float64 over at most a few
    hundred entries: float32 sums over the whole vocabulary would shift the boundaries by ~1e-5."""
    p = probs.detach().float().reshape(-1)
    block = _pick(_block_mass(p), generator)
    return block * _BLOCK + _pick(p[block * _BLOCK:(block + 1) * _BLOCK].double().cpu(), generator)


def _block_mass(p: torch.Tensor) -> torch.Tensor:
    """The mass of each `_BLOCK`-token block of a 1-D distribution (the last block may be shorter), as
    float64 on the CPU; a view of the whole blocks, no copy of the vocabulary."""
    whole = p.numel() // _BLOCK * _BLOCK
    mass = p[:whole].view(-1, _BLOCK).sum(-1)
    if whole < p.numel():
        mass = torch.cat([mass, p[whole:].sum().reshape(1)])
    return mass.double().cpu()


def _pick(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Index i with probability weights[i] / weights.sum() (a short float64 CPU tensor: numpy does the
    few hundred-entry work, torch's per-call overhead would dominate it)."""
    cdf = np.cumsum(weights.numpy())
    total = float(cdf[-1])
    if not 0.0 < total < float("inf"):
        raise ValueError(f"cannot sample from weights summing to {total}")
    u = float(torch.rand(1, generator=generator, dtype=torch.float64)) * total
    index = int(np.searchsorted(cdf, u, side="right"))  # entries of weight 0 own an empty interval
    if index >= len(cdf):  # u * total rounded up to total: the last token with weight
        index = int(np.flatnonzero(weights.numpy() > 0)[-1])
    return index


def argmax(x: torch.Tensor) -> int | list[int]:
    """`x.argmax(-1).tolist()` (the first index of the largest entry, per row), by `vocab.argmax`."""
    return vocab.argmax(x).tolist()


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The token a plain decoder emits from one position's logits."""
    if sampling.greedy:
        return argmax(logits)
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
