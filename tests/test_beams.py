"""Beam baselines: beam_search equals transformers' beam search; beam sampling and diverse beam search
reduce to what they should; the batched forest pass equals separate causal passes."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from methods.base import BudgetExhausted, DecodeContext, Sampling, SettingError, get_method
from methods.common.beams import BeamCache, distinct_ngrams

PROMPTS = [[4, 6, 9, 7, 8], [10, 11, 12, 10, 11, 12, 10, 11], [5, 5, 5, 20, 21]]


def decode(name, model, prompt, eos=frozenset({1}), sampling=Sampling(), max_new_tokens=20, **settings):
    ctx = DecodeContext(prompt_ids=prompt, target=model, draft=None, sampling=sampling,
                        max_new_tokens=max_new_tokens, eos_token_ids=eos)
    out = get_method(name)(**settings).generate(ctx)
    assert sum(ctx.trace.accepted) == len(out)  # the harness's trace check
    assert not any(ctx.trace.proposed)  # baselines draft nothing: the report's Drafting table leaves them out
    return out, ctx


def transformers_beam_search(model, prompt, eos, num_beams, max_new_tokens=20):
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                              eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0], length_penalty=1.0,
                              early_stopping=False)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    out = out[0, len(prompt):].tolist()
    end = next((i + 1 for i, tok in enumerate(out) if tok in eos), len(out))
    return out[:end]


@pytest.mark.parametrize("num_beams", [1, 2, 4])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_beam_search_equals_transformers(num_beams, prompt, pair):
    target, _ = pair
    for eos in (frozenset({1}), frozenset({prompt[1]}), frozenset({7, 9})):
        ours, ctx = decode("beam_search", target, prompt, eos=eos, num_beams=num_beams)
        assert ours == transformers_beam_search(target, prompt, eos, num_beams), (sorted(eos), num_beams)
        assert all(a in (0, 1) for a in ctx.trace.accepted)  # one pass per step, the chosen beam's token


def test_beam_search_with_one_beam_is_greedy(pair):
    target, _ = pair
    assert decode("beam_search", target, PROMPTS[0], num_beams=1)[0] == decode("ar", target, PROMPTS[0])[0]


def test_beam_sampling_with_one_beam_is_sampling(pair):
    target, _ = pair
    for seed in range(4):
        s = Sampling(temperature=1.0, top_k=20, seed=seed)
        assert decode("beam_sampling", target, PROMPTS[0], sampling=s, num_beams=1)[0] == \
            decode("ar", target, PROMPTS[0], sampling=s)[0]


def test_beam_sampling_at_temperature_zero_is_greedy(pair):
    target, _ = pair
    assert decode("beam_sampling", target, PROMPTS[1])[0] == decode("ar", target, PROMPTS[1])[0]


def test_beam_sampling_prefers_likely_sequences(pair):
    """Over seeds, the chosen beam's mean log-probability beats plain sampling's (what beams are for)."""
    from harness.quality import output_perplexity

    target, _ = pair
    beam, plain = [], []
    for seed in range(6):
        s = Sampling(temperature=1.0, seed=seed)
        beam.append(output_perplexity(target, PROMPTS[0], decode("beam_sampling", target, PROMPTS[0], sampling=s)[0]))
        plain.append(output_perplexity(target, PROMPTS[0], decode("ar", target, PROMPTS[0], sampling=s)[0]))
    assert sum(beam) < sum(plain)


def test_diverse_beam_one_group_is_beam_search_and_lambda_adds_diversity(pair):
    target, _ = pair
    one_group = decode("diverse_beam", target, PROMPTS[0], num_beams=4, num_groups=1)[0]
    assert one_group == decode("beam_search", target, PROMPTS[0], num_beams=4, early_stopping="true")[0]
    low = decode("diverse_beam", target, PROMPTS[0], diversity_strength=0.0)[1].extras
    high = decode("diverse_beam", target, PROMPTS[0], diversity_strength=5.0)[1].extras
    assert high["beam_distinct_2"] > low["beam_distinct_2"]
    with pytest.raises(SettingError, match="num_groups must divide"):  # when built, before any pass
        get_method("diverse_beam")(num_beams=4, num_groups=3)


def test_distinct_ngrams():
    assert distinct_ngrams([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_ngrams([[1, 2], [1, 2]], 1) == pytest.approx(2 / 4)
    assert distinct_ngrams([[1]], 2) is None


def test_budget_stop_still_emits_the_best_beam_so_far(pair):
    target, _ = pair
    from harness.instrument import Budget, PassCounter

    counter = PassCounter(target, "target")
    try:
        for name in ("beam_search", "beam_sampling", "diverse_beam"):
            counter.reset(Budget(max_target_calls=5))
            ctx = DecodeContext(prompt_ids=PROMPTS[0], target=target, sampling=Sampling(), max_new_tokens=20,
                                eos_token_ids=frozenset())
            with pytest.raises(BudgetExhausted):
                get_method(name)().generate(ctx)
            assert len(ctx.output) == 5 and ctx.trace.accepted == [1] * 5 and counter.calls == 5, name
    finally:
        counter.remove()


def test_forest_pass_equals_causal_passes(pair):
    target, _ = pair
    cache = BeamCache(target)
    cache.feed([[4, 6, 9], [4, 7, 9]])  # two beams of three tokens
    # row 0: pending 10, nodes 11 (child of 10), 12 (child of 10), 13 (child of 11); row 1: pending 20, node 21
    forest = [[(11, -1), (12, -1), (13, 0)], [(21, -1)]]
    logits = cache.feed([[10], [20]], forest)
    expected = {(0, 1): [4, 6, 9, 10, 11], (0, 2): [4, 6, 9, 10, 12], (0, 3): [4, 6, 9, 10, 11, 13],
                (0, 0): [4, 6, 9, 10], (1, 1): [4, 7, 9, 20, 21]}
    for (r, col), seq in expected.items():
        with torch.inference_mode():
            ref = target(torch.tensor([seq])).logits[0, -1].float()
        assert torch.allclose(logits[r, col], ref, atol=1e-4), (r, col)
    # two beams from row 0's tree: ...10 11 (positions 0-4) and ...10 12 (positions 0-3 and 5)
    kept = cache.select([0, 0], [[0, 1, 2, 3, 4], [0, 1, 2, 3, 5]])
    out = kept.feed([[30], [30]])
    for r, seq in enumerate(([4, 6, 9, 10, 11, 30], [4, 6, 9, 10, 12, 30])):
        with torch.inference_mode():
            ref = target(torch.tensor([seq])).logits[0, -1].float()
        assert torch.allclose(out[r, -1], ref, atol=1e-4), r


def test_settings_are_checked_when_built():
    for name, settings, field in [("beam_search", {"num_beams": 0}, "num_beams"),
                                  ("beam_search", {"early_stopping": "sometimes"}, "early_stopping"),
                                  ("beam_sampling", {"num_beams": 0}, "num_beams"),
                                  ("diverse_beam", {"diversity_strength": -1.0}, "diversity_strength")]:
        with pytest.raises(SettingError, match=f"{name}.{field}"):
            get_method(name)(**settings)


def test_blocked_helpers_equal_torch_on_a_large_vocabulary():
    """argmax and topk run in two stages on a CPU (block maxima first): the same indices and values as torch."""
    from methods.common.vocab import argmax
    from methods.common.vocab import top_k as topk

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 151_936, generator=g)
    x[1, 7] = x[1, 90_000] = 50.0  # a tie for the maximum: the first index wins, as in torch
    assert torch.equal(argmax(x), x.argmax(-1))
    for k in (1, 6, 8):
        values, index = topk(x, k)
        expected = torch.topk(x, k, dim=-1)
        assert torch.equal(values, expected.values) and torch.equal(x.gather(-1, index), expected.values)


def test_draws_sample_the_distribution_and_never_a_zero_entry():
    from methods.common.vocab import BLOCK, sample

    p = torch.zeros(3 * BLOCK + 17)
    p[[1, 3, BLOCK - 1, BLOCK, 2 * BLOCK + 5, 3 * BLOCK + 16]] = torch.tensor([0.1, 0.3, 0.05, 0.25, 0.2, 0.1])
    picks = sample(p[None], 100_000, torch.Generator().manual_seed(0))[0]
    freq = torch.bincount(picks, minlength=len(p)).double() / len(picks)
    assert freq[p == 0].sum() == 0
    assert torch.allclose(freq, p.double(), atol=0.005)


def test_greedy_joint_agrees_with_the_dense_one_hot_joint():
    """Greedy runs keep the beams' joint on the host (one number per beam); the dense form of the same
    one-hot distributions gives the same values, alignment and residual."""
    from methods.common.beams import GreedyJoint, Joint, joint

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    log_w = [0.0, -1.0, -0.5]
    greedy = joint(logits, log_w, Sampling())
    assert isinstance(greedy, GreedyJoint) and greedy.tokens == logits.argmax(-1).tolist()
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 40).float()
    w = torch.tensor(log_w).exp()
    dense = Joint(w[:, None] * one_hot / w.sum(), one_hot)
    beams, tokens = [0, 1, 2, 2], [greedy.tokens[0], greedy.tokens[1], greedy.tokens[2], 0]
    assert greedy.at(beams, tokens) == pytest.approx(dense.at(beams, tokens))
    assert greedy.per_beam_at(beams, tokens) == pytest.approx(dense.per_beam_at(beams, tokens))
    other = GreedyJoint([greedy.tokens[1], 5, greedy.tokens[2]], [0.5, 0.3, 0.2])  # entries of another joint
    aligned = greedy.on([1, 0, 2], other)
    assert aligned == pytest.approx([float(dense.probs[1, other.tokens[0]]), float(dense.probs[0, 5]),
                                     float(dense.probs[2, other.tokens[2]])])
    drawn = greedy.draw(2000, torch.Generator().manual_seed(1))
    share = torch.bincount(torch.tensor(drawn[0]), minlength=3).double() / 2000
    assert torch.allclose(share, (w / w.sum()).double(), atol=0.04)


def test_joint_computes_a_repeated_beam_once():
    """Beams holding the same sequence share a row: the joint equals the one over the repeated rows."""
    from methods.common.beams import joint

    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    log_w, beams, tokens = [0.0, -0.3, -1.0], [0, 1, 2, 2], [3, 3, 7, 11]
    for sampling in (Sampling(), Sampling(temperature=0.8, top_k=10)):
        shared = joint(logits, log_w, sampling, rows=[0, 0, 1])
        repeated = joint(logits[[0, 0, 1]], log_w, sampling)
        greedy_tokens = logits.argmax(-1).tolist()
        probe = tokens if not sampling.greedy else [greedy_tokens[0], greedy_tokens[0], greedy_tokens[1], 0]
        assert shared.at(beams, probe) == pytest.approx(repeated.at(beams, probe))
        assert shared.per_beam_at(beams, probe) == pytest.approx(repeated.per_beam_at(beams, probe))
