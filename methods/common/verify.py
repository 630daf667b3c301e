"""Verification rules for draft tokens against one target pass.

`target_logits` has one row per draft token plus one: row i scores the token
at draft position i, the last row gives the bonus token.
"""
from __future__ import annotations

import torch

from methods.base import Sampling
from methods.common.sampling import sample, warp


def verify_greedy(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of `draft` equal to the target's argmax; returns (accepted, next token)."""
    choices = target_logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(draft) and draft[accepted] == choices[accepted]:
        accepted += 1
    return accepted, choices[accepted]


def verify_speculative(
    draft: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al.; Chen et al.): accept draft i with min(1, p/q);
    at the first rejection sample from normalise(max(0, p - q)); if all pass, sample the bonus from p.

    `draft_probs` is (k x V), the distributions the draft tokens were sampled from (one-hot for a
    deterministic drafter); `target_probs` is (k+1 x V). The result is distributed exactly as p.
    """
    for i, tok in enumerate(draft):
        p, q = float(target_probs[i, tok]), float(draft_probs[i, tok])
        u = float(torch.rand((), generator=generator))
        if q > 0 and u * q < p:  # u < p/q without dividing
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        total = residual.sum()
        if total <= 0:  # p == q up to rounding: nothing to correct, sample p
            residual, total = target_probs[i], target_probs[i].sum()
        return i, sample(residual / total, generator)
    return len(draft), sample(target_probs[len(draft)], generator)


def verify(
    draft: list[int],
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Greedy or stochastic verification, whichever `sampling` asks for."""
    if sampling.greedy:
        return verify_greedy(draft, target_logits)
    if draft_probs is None:  # deterministic drafter: q is one-hot on each draft token
        draft_probs = torch.zeros(len(draft), target_logits.shape[-1])
        draft_probs[torch.arange(len(draft)), torch.tensor(draft, dtype=torch.long)] = 1.0
    return verify_speculative(draft, draft_probs.cpu(), warp(target_logits, sampling).cpu(), generator)
