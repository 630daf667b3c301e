"""DSBD and MJSD: what they reduce to, and DSBD's width rule."""
from __future__ import annotations

import pytest
import torch

from methods.base import DecodeContext, Sampling, get_method
from methods.dsbd import accepted_count_distribution, adaptive_width

PROMPT = [4, 6, 9, 7]


def decode(name, pair, sampling=Sampling(), max_new_tokens=20, **settings):
    target, draft = pair
    ctx = DecodeContext(prompt_ids=PROMPT, target=target, draft=draft, sampling=sampling,
                        max_new_tokens=max_new_tokens, eos_token_ids=frozenset({1}))
    out = get_method(name)(**settings).generate(ctx)
    assert sum(ctx.trace.accepted) == len(out)  # the harness's trace check (one step per target pass)
    return out, ctx


def test_dsbd_width_one_is_speculative_sampling(pair):
    """Width 1: one draft chain sampled from q, min(1, p/q) acceptance, residual resampling, bonus from p --
    speculative sampling, token for token and pass for pass with the same seed."""
    for seed in range(4):
        s = Sampling(temperature=1.0, top_k=30, seed=seed)
        ours, ctx = decode("dsbd", pair, s, max_width=1, gamma=3)
        theirs, sps_ctx = decode("sps", pair, s, gamma=3)
        assert ours == theirs and ctx.trace.accepted == sps_ctx.trace.accepted


@pytest.mark.parametrize("settings", [{}, {"keep_one_beam": True}, {"max_width": 2, "gamma": 1}])
def test_dsbd_at_temperature_zero_is_greedy(pair, settings):
    assert decode("dsbd", pair, **settings)[0] == decode("ar", pair)[0]


def test_dsbd_runs_beams_and_reports_width(pair):
    out, ctx = decode("dsbd", pair, Sampling(temperature=0.7, seed=3), max_width=3, width_threshold=0.05)
    assert out and 1 <= ctx.extras["dsbd_mean_width"] <= 3
    # every pass verifies its whole forest: at least the drafts the output kept from it, at most width x gamma
    # per row (3 rows x 3 levels at max_width 3, gamma 3)
    for proposed, accepted in zip(ctx.trace.proposed, ctx.trace.accepted):
        assert accepted - 1 <= proposed <= 3 * 3 * 3
    assert "beam_distinct_2" in ctx.extras
    with pytest.raises(ValueError):
        decode("dsbd", pair, min_width=5)


def test_accepted_count_distribution_by_enumeration():
    """Two draws from q on a 3-token vocabulary: enumerate draws and uniform u's exactly."""
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    accept1 = torch.minimum(torch.ones(3, dtype=torch.float64), p / q)
    rest = (p - q).clamp_min(0) / (p - q).clamp_min(0).sum()
    accept_after_reject = torch.minimum(torch.ones(3, dtype=torch.float64), rest / q)
    for x1 in range(3):
        for x2 in range(3):
            w = q[x1] * q[x2]
            a1 = accept1[x1]
            expected[2] += w * a1 * accept1[x2]
            expected[1] += w * (a1 * (1 - accept1[x2]) + (1 - a1) * accept_after_reject[x2])
            expected[0] += w * (1 - a1) * (1 - accept_after_reject[x2])
    assert torch.allclose(accepted_count_distribution(p, q, 2), expected)


def test_adaptive_width_rule_responds_to_agreement_and_threshold():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    assert adaptive_width(p, p.clone(), 4, 0.7, 1) == 4  # draft = target: every draw is accepted
    far = torch.tensor([0.01, 0.01, 0.01, 0.97], dtype=torch.float64)
    assert adaptive_width(p, far, 4, 0.7, 1) < 4  # a poor draft: fewer beams are worth keeping
    assert adaptive_width(p, far, 4, 0.7, 2) >= 2  # never below min_width
    mid = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)
    widths = [adaptive_width(p, mid, 4, t, 1) for t in (0.1, 0.5, 0.9, 0.99)]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]  # stricter threshold, narrower
    dist = accepted_count_distribution(p, mid, 4)
    w = adaptive_width(p, mid, 4, 0.7, 1)
    assert dist[w:].sum() >= 0.7 and (w == 4 or dist[w + 1:].sum() < 0.7)  # the largest w with P(K >= w) >= t


def test_mjsd_without_draft_tokens_is_autoregressive_sampling(pair):
    """gamma 0: one token per target pass, sampled from the target -- `ar` with the same seed."""
    for seed in range(3):
        s = Sampling(temperature=1.0, seed=seed)
        assert decode("mjsd", pair, s, gamma=0)[0] == decode("ar", pair, s)[0]


@pytest.mark.parametrize("candidates", ["best", "tree"])
def test_mjsd_at_temperature_zero_is_greedy(pair, candidates):
    assert decode("mjsd", pair, candidates=candidates)[0] == decode("ar", pair)[0]


def test_mjsd_accepts_the_longest_passing_prefix(pair):
    """The rule on a hand-made chain: prefix ratios pass at depths 1 and 3 but not 2 -> depth 3 is accepted."""
    from methods.common.tree import DraftTree
    from methods.mjsd import MultiTokenJointSpeculativeDecoding, _DraftBeam

    method = MultiTokenJointSpeculativeDecoding()
    tree = DraftTree()
    nodes = tree.add_path([1, 2, 3])
    # target probabilities of the drafted tokens: 0.5, then 0.1, then 1.0 -> joint 0.5, 0.05, 0.05
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.2, 0.1], [0.3, 0.3, 0.1, 0.3],
                                     [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]]).clamp_min(1e-30))
    log_q = torch.log(torch.tensor([0.6, 0.6 * 0.9, 0.6 * 0.9 * 0.09])).tolist()  # ratios .83, .09, 1.03
    candidates = [[_DraftBeam(n, lq)] for n, lq in zip(nodes, log_q)]
    ctx = DecodeContext(prompt_ids=[0], target=pair[0], sampling=Sampling(temperature=1.0), max_new_tokens=5,
                        eos_token_ids=frozenset())
    path, _ = method._rule(ctx, tree, logits, candidates)
    assert path == nodes
    method.config.accept_threshold = 1.1  # nothing passes: no draft token is accepted
    assert method._rule(ctx, tree, logits, candidates)[0] == []


def _iterative_alphas(p, q, draws):
    """The definition: p_0 = p, p_{s+1} = residual(p_s, q), alpha_s = sum(min(p_s, q))."""
    from methods.common.verify import residual

    alphas, p_s = [], p
    for _ in range(draws):
        alphas.append(float(torch.minimum(p_s, q).sum()))
        p_s = residual(p_s, q)
    return alphas, p_s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_residual_chain_closed_form_equals_the_iterated_residuals(dtype):
    """DSBD's width rule and acceptance read the residuals in closed form (max(0, p - t_s q) / n_s): it must
    equal residual() applied s times, also where nothing is left (p <= q: residual keeps p_s)."""
    from methods.dsbd import residual_chain

    g = torch.Generator().manual_seed(0)
    cases = [(torch.rand(2, 50, generator=g), torch.rand(2, 50, generator=g)) for _ in range(5)]
    same = torch.rand(40, generator=g)
    cases += [(same, same.clone()),  # a perfect draft: every draw accepted
              (torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0.5, 0.5, 0])),  # disjoint supports
              (torch.tensor([0.7, 0.3, 0, 0]), torch.tensor([0.5, 0.1, 0.2, 0.2]))]
    for p, q in cases:  # joints over (beam, token): residual() normalises along the last dim, so flatten
        p, q = p.to(dtype).flatten(), q.to(dtype).flatten()
        p, q = p / p.sum(), q / q.sum()
        expected, _ = _iterative_alphas(p, q, 5)
        alphas, t, n = residual_chain(p, q, 5)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert alphas == pytest.approx(expected, abs=tol)
        for s in range(6):  # p_s itself
            closed = (p - t[s] * q).clamp_min(0) / n[s]
            assert torch.allclose(closed, _iterative_alphas(p, q, s)[1], atol=tol)
        # the host form (greedy runs: lists of floats) gives the same chain
        host = residual_chain(p.tolist(), q.tolist(), 5)
        assert host[0] == pytest.approx(alphas, abs=tol)


def test_sequential_acceptance_matches_the_exact_count_distribution():
    """The acceptance as the method runs it (W i.i.d. draws from q over (beam, token), p_s from the closed
    form): the number accepted follows accepted_count_distribution, and the first beam out is a sample of p."""
    from methods.dsbd import accepted_count_distribution, residual_chain, sequential_accept

    p = torch.tensor([[0.30, 0.05, 0.15], [0.0, 0.25, 0.25]], dtype=torch.float64).flatten()  # beam 1 half-valid
    q = torch.tensor([[0.10, 0.30, 0.10], [0.20, 0.05, 0.25]], dtype=torch.float64).flatten()
    draws, trials, g = 3, 40000, torch.Generator().manual_seed(0)
    _, t, n = residual_chain(p, q, draws)
    counts, first = torch.zeros(draws + 1, dtype=torch.float64), torch.zeros(len(p), dtype=torch.float64)
    picks = torch.multinomial(q, trials * draws, replacement=True, generator=g).view(trials, draws)
    for row in picks.tolist():
        accepted, s = sequential_accept([float(p[x]) for x in row], [float(q[x]) for x in row], t, n, draws, g)
        counts[len(accepted)] += 1
        # the first beam out: the first accepted draw, or (none) a sample of the residual left, p_s
        rest = (p - t[s] * q).clamp_min(0) / n[s]
        first[row[accepted[0]] if accepted else int(torch.multinomial(rest, 1, generator=g))] += 1
    exact = accepted_count_distribution(p, q, draws)
    assert torch.allclose(counts / trials, exact, atol=0.01), (counts / trials, exact)
    assert torch.allclose(first / trials, p, atol=0.01)


def test_settings_are_checked_when_built():
    from methods.base import SettingError

    for name, settings, field in [("dsbd", {"gamma": -1}, "gamma"), ("dsbd", {"min_width": 5}, "min_width"),
                                  ("dsbd", {"width_threshold": 0.0}, "width_threshold"),
                                  ("mjsd", {"candidates": "all"}, "candidates"),
                                  ("mjsd", {"accept_threshold": 0.0}, "accept_threshold"),
                                  ("mjsd", {"beam_width": 0}, "beam_width")]:
        with pytest.raises(SettingError, match=f"{name}.{field}"):
            get_method(name)(**settings)
    assert get_method("mjsd")(candidates="tree").config.candidates == "tree"
