"""Row-wise argmax, top-k and sampling over a large vocabulary (methods/common/vocab.py): the blocked
CPU paths give torch's results, and the draws follow the distribution exactly."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from methods.common import vocab
from methods.common.sampling import gumbel_top_k


def rows_with_ties(seed: int, rows: int, size: int) -> torch.Tensor:
    """Logits rounded to bfloat16 steps (many ties, as a bf16 model gives), some rows with a tied maximum."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, size, generator=g) * 3).to(torch.bfloat16).float()
    x[0, [5, size // 2, size - 1]] = x[0].max() + 1  # three tied maxima, far apart
    x[-1, -1] = x[-1].max() + 1  # the maximum in the last (padded) block
    return x


@pytest.mark.parametrize("size", [151_936, 32_000, 50_257, 4_100])
def test_argmax_and_top_k_equal_torch(size):
    x = rows_with_ties(size, 7, size)
    assert torch.equal(vocab.argmax(x), x.argmax(-1))  # the FIRST maximal index, as greedy decoding takes
    assert torch.equal(vocab.argmax(x[3]), x[3].argmax(-1))
    for k in (1, 2, 8, 40):
        values, indices = vocab.top_k(x, k)
        assert torch.equal(values, torch.topk(x, k).values)
        assert torch.equal(x.gather(-1, indices), values)  # tied entries may be others than torch's
        assert all(len(set(r)) == k for r in indices.tolist())


def test_log_probs_at():
    x = torch.randn(3, 5000)
    tokens = torch.tensor([[1, 7], [0, 4999], [12, 13]])
    torch.testing.assert_close(vocab.log_probs_at(x, tokens), x.log_softmax(-1).gather(-1, tokens))


@pytest.mark.parametrize("size", [4, 300])
def test_sample_matches_the_distribution(size):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, size, generator=g) ** 4
    probs[:, ::3] = 0.0  # tokens without mass are never drawn
    draws = vocab.sample(probs, 20000, torch.Generator().manual_seed(1))
    for r in range(2):
        counts = np.bincount(draws[r].numpy(), minlength=size)
        expected = (probs[r] / probs[r].sum()).double().numpy() * draws.shape[1]
        assert counts[expected == 0].sum() == 0
        keep = expected > 0
        assert chisquare(counts[keep], expected[keep] * counts.sum() / expected[keep].sum()).pvalue > 1e-3


@pytest.mark.parametrize("q", [[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.015, 0.005]])
def test_sample_distinct_is_plackett_luce(q):
    """Ordered pairs drawn without replacement: P(a, b) = q_a q_b / (1 - q_a), for a flat q (i.i.d.
    first appearances) and a peaked one (direct draws from the rest once the seen mass is large)."""
    q = torch.tensor(q)
    g = torch.Generator().manual_seed(3)
    pairs = list(itertools.permutations(range(4), 2))
    counts = dict.fromkeys(pairs, 0)
    n = 6000
    for _ in range(n):
        counts[tuple(vocab.sample_distinct(q, 2, g))] += 1
    expected = np.array([float(q[a] * q[b] / (1 - q[a])) for a, b in pairs]) * n
    observed = np.array([counts[p] for p in pairs])
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_sample_distinct_stops_when_the_mass_runs_out():
    q = torch.tensor([0.0, 0.7, 0.0, 0.3])
    assert sorted(vocab.sample_distinct(q, 4, torch.Generator().manual_seed(0))) == [1, 3]
    assert vocab.sample_distinct(torch.zeros(4), 2, torch.Generator()) == []
    assert gumbel_top_k(torch.full((4,), float("-inf")), 2, torch.Generator()) == []
    assert gumbel_top_k(torch.tensor([0.0, -1.0, float("-inf"), 2.0]), 5, None) == [3, 0, 1]
