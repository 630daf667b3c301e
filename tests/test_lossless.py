"""Every lossless method reproduces `ar` token for token under greedy decoding (tiny random models)."""
from __future__ import annotations

import pytest

from methods.base import DecodeContext, Sampling, get_method, registry

PROMPTS = [[4, 6, 9, 7, 8], [10, 11, 12, 10, 11, 12, 10, 11], [5] * 3 + [20, 21, 22, 5, 5, 5, 20, 21]]
LOSSLESS = sorted(name for name, cls in registry().items() if cls.lossless and name != "ar" and not cls.needs.trained)


def decode(name: str, pair, prompt, max_new_tokens=40, eos=frozenset({1}), sampling=Sampling(), **settings):
    target, draft = pair
    ctx = DecodeContext(prompt_ids=prompt, target=target, draft=draft, sampling=sampling,
                        max_new_tokens=max_new_tokens, eos_token_ids=eos)
    return get_method(name)(**settings).generate(ctx), ctx


@pytest.mark.parametrize("name", LOSSLESS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_ar(name, prompt, pair):
    expected, _ = decode("ar", pair, prompt)
    got, ctx = decode(name, pair, prompt)
    assert got == expected
    if ctx.trace.accepted:  # the trace a method keeps must add up to its output
        assert sum(ctx.trace.accepted) == len(got)


@pytest.mark.parametrize("name", LOSSLESS)
def test_stops_at_eos_and_budget_of_new_tokens(name, pair):
    reference, _ = decode("ar", pair, PROMPTS[0], max_new_tokens=30, eos=frozenset())
    eos = frozenset({reference[7]})  # pretend the 8th token is end-of-sequence
    cut = reference[: reference.index(reference[7]) + 1]
    assert decode(name, pair, PROMPTS[0], max_new_tokens=30, eos=eos)[0] == cut
    assert decode(name, pair, PROMPTS[0], max_new_tokens=3, eos=frozenset())[0] == reference[:3]


@pytest.mark.parametrize("gamma", [1, 2, 7])
def test_sps_any_draft_length(gamma, pair):
    assert decode("sps", pair, PROMPTS[1], gamma=gamma)[0] == decode("ar", pair, PROMPTS[1])[0]


def test_sps_with_identical_draft_accepts_everything(pair):
    target, _ = pair
    _, ctx = decode("sps", (target, target), PROMPTS[0], max_new_tokens=25, eos=frozenset(), gamma=4)
    # every pass (the first also prefills the prompt) accepts 4 drafts + 1 bonus
    assert ctx.trace.accepted == [5, 5, 5, 5, 5]


def test_sampling_is_reproducible_with_a_seed(pair):
    s = Sampling(temperature=1.0, seed=7)
    for name in ("ar", "sps", "pld"):
        assert decode(name, pair, PROMPTS[0], sampling=s)[0] == decode(name, pair, PROMPTS[0], sampling=s)[0]
