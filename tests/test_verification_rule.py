"""The speculative sampling rule reproduces the target's distribution exactly (small vocabulary).

A toy Markov 'target' p(x | last token) and 'draft' q(x | last token) over 4 tokens; we run
draft-then-verify steps and compare the distribution of the first 3 emitted tokens with the
exact autoregressive distribution under p, by a chi-square test with a fixed seed.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from methods.base import Sampling
from methods.common.sampling import sample, warp
from methods.common.verify import verify, verify_speculative

V, LENGTH, DRAWS = 4, 3, 12000


def tables(seed: int):
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(V, V, generator=g) * 1.5
    draft_logits = torch.randn(V, V, generator=g) * 1.5
    return target_logits, draft_logits


def exact_sequence_probs(p: torch.Tensor, first: int, length: int = LENGTH) -> dict[tuple, float]:
    probs = {}
    for seq in itertools.product(range(V), repeat=length):
        prob, last = 1.0, first
        for tok in seq:
            prob *= float(p[last, tok])
            last = tok
        probs[seq] = prob
    return probs


def speculative_sequence(p, q, first, gamma, generator, one_hot_draft=False):
    """Emit LENGTH tokens by draft-then-verify with the rule under test."""
    out, last = [], first
    while len(out) < LENGTH:
        drafts, qs, prev = [], [], last
        for _ in range(gamma):
            dist = q[prev]
            tok = int(dist.argmax()) if one_hot_draft else sample(dist, generator)
            drafts.append(tok)
            qs.append(torch.nn.functional.one_hot(torch.tensor(tok), V).float() if one_hot_draft else dist)
            prev = tok
        context = [last] + drafts
        ps = torch.stack([p[c] for c in context])  # p at each draft position, plus the bonus row
        accepted, nxt = verify_speculative(drafts, torch.stack(qs), ps, generator)
        out += drafts[:accepted] + [nxt]
        last = out[-1]
    return tuple(out[:LENGTH])


def assert_matches(p, first, draw, draws=DRAWS, length=LENGTH):
    g = torch.Generator().manual_seed(1234)
    counts = {}
    for _ in range(draws):
        seq = draw(g)
        counts[seq] = counts.get(seq, 0) + 1
    exact = exact_sequence_probs(p, first, length)
    keys = sorted(exact)
    observed = np.array([counts.get(k, 0) for k in keys], dtype=float)
    expected = np.array([exact[k] for k in keys])
    expected = expected / expected.sum() * draws  # float32 tables: renormalise in float64
    assert observed.sum() == draws
    impossible = expected == 0
    assert observed[impossible].sum() == 0, "emitted a sequence the target gives probability 0"
    result = chisquare(observed[~impossible], expected[~impossible])
    assert result.pvalue > 1e-3, f"distribution differs from the target's (p-value {result.pvalue:.2e})"


@pytest.mark.parametrize("gamma", [1, 3])
def test_speculative_sampling_matches_target_distribution(gamma):
    target_logits, draft_logits = tables(0)
    p, q = target_logits.softmax(-1), draft_logits.softmax(-1)
    assert_matches(p, 0, lambda g: speculative_sequence(p, q, 0, gamma, g))


def test_deterministic_draft_matches_target_distribution():
    """A copied draft (prompt lookup) has one-hot q; the rule must still give exactly p."""
    target_logits, draft_logits = tables(1)
    p, q = target_logits.softmax(-1), draft_logits.softmax(-1)
    assert_matches(p, 2, lambda g: speculative_sequence(p, q, 2, 2, g, one_hot_draft=True))


def test_warped_target_is_what_is_matched():
    """With temperature and top-k, the emitted tokens follow the warped target distribution."""
    sampling = Sampling(temperature=0.7, top_k=3, seed=0)
    target_logits, draft_logits = tables(2)
    p, q = warp(target_logits, sampling), warp(draft_logits, sampling)
    assert (p == 0).sum(-1).eq(1).all()  # top-3 of 4 leaves one token out per row
    assert_matches(p, 1, lambda g: speculative_sequence(p, q, 1, 2, g))


def test_greedy_verification_prefix_and_correction():
    logits = torch.tensor([[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    assert verify([1, 0], None, logits, Sampling(), torch.Generator()) == (2, 2)
    assert verify([1, 2], None, logits, Sampling(), torch.Generator()) == (1, 0)
    assert verify([2, 0], None, logits, Sampling(), torch.Generator()) == (0, 1)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = warp(logits, Sampling(temperature=1.0, top_p=0.8))
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
