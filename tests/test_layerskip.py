"""Self-speculation by layer skipping: the skip mechanism, the shared KV cache, the harness's accounting."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.instrument import PassCounter, registered_state_bytes, state_bytes
from methods.base import DecodeContext, Sampling, get_method
from methods.common.kv import crop, extend, new_cache
from methods.common.layerskip import SkipSet, draft_chain, prefix_view, skipped_forward
from methods.common.tree import ROOT
from methods.layer_skip import uniform_skip_set
from tests.conftest import tiny_llama

PROMPT = [4, 6, 9, 7, 8, 10, 11, 12]


@pytest.fixture(scope="module")
def deep():
    return tiny_llama(seed=3, layers=6)


def context(model, max_new_tokens=40, sampling=Sampling()):
    return DecodeContext(prompt_ids=list(PROMPT), target=model, sampling=sampling,
                         max_new_tokens=max_new_tokens, eos_token_ids=frozenset())


def full_logits(model, tokens):
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0]


def test_empty_skip_set_is_the_full_model_and_skipping_changes_it(deep):
    reference = full_logits(deep, PROMPT)
    assert torch.allclose(skipped_forward(deep, PROMPT, new_cache(deep), SkipSet(), keep=None), reference, atol=1e-5)
    skipped = skipped_forward(deep, PROMPT, new_cache(deep), SkipSet.of([0, 2], [3]), keep=None)
    assert not torch.allclose(skipped, reference, atol=1e-3)
    # the original forwards are back after the block
    assert torch.allclose(full_logits(deep, PROMPT), reference)


def test_a_skipped_layer_matches_removing_it_by_hand(deep):
    skip = SkipSet.of([1, 4], [1, 4])
    kept = [layer for i, layer in enumerate(deep.model.layers) if i not in (1, 4)]
    all_layers = deep.model.layers
    try:
        deep.model.layers = torch.nn.ModuleList(kept)
        expected = full_logits(deep, PROMPT)
    finally:
        deep.model.layers = all_layers
    got = skipped_forward(deep, PROMPT, new_cache(deep), skip, keep=None)
    assert torch.allclose(got, expected, atol=1e-5)


def test_draft_leaves_the_cache_as_the_verification_needs_it(deep):
    cache = new_cache(deep)
    extend(deep, PROMPT, cache)
    ctx = context(deep)
    drafts, rows, confidence = draft_chain(ctx, cache, 5, SkipSet.of([0, 3], [2, 5]), 6)
    assert len(drafts) == 6 and rows == [] and confidence == []  # only what is asked for is computed
    assert {layer.get_seq_length() for layer in cache.layers} == {len(PROMPT)}
    again, rows, _ = draft_chain(ctx, cache, 5, SkipSet.of([0, 3], [2, 5]), 6, keep_logits=True)
    assert again == drafts == torch.stack(rows).argmax(-1).tolist()  # greedy rows are the logits
    assert {layer.get_seq_length() for layer in cache.layers} == {len(PROMPT)}
    # a full pass on the shared cache now equals a full pass from scratch
    after = extend(deep, [5] + drafts, cache, keep=None)
    assert torch.allclose(after, full_logits(deep, PROMPT + [5] + drafts)[len(PROMPT):], atol=1e-4)


def test_confidence_threshold_stops_drafting(deep):
    cache = new_cache(deep)
    extend(deep, PROMPT, cache)
    drafts, _, confidence = draft_chain(context(deep), cache, 5, SkipSet.of([2], [2]), 10, stop_below=1.01)
    assert len(drafts) == 1 and len(confidence) == 1  # every confidence is below 1.01: one token, then stop
    for sampling in (Sampling(), Sampling(temperature=1.0, seed=2), Sampling(temperature=0.5, seed=2)):
        drafts, _rows, confidence = draft_chain(context(deep, sampling=sampling), cache, 5, SkipSet.of([2], [2]), 4,
                                               stop_below=0.0)
        plain = skipped_forward(deep, [5], cache, SkipSet.of([2], [2]))[-1].softmax(-1)
        crop(cache, len(PROMPT))
        assert confidence[0] == pytest.approx(float(plain[drafts[0]]), rel=1e-4)  # not the tempered q


def test_prefix_view_leaves_the_cache_alone(deep):
    cache = new_cache(deep)
    extend(deep, PROMPT, cache)
    before = [layer.keys.clone() for layer in cache.layers]
    view = prefix_view(cache, 4)
    logits = skipped_forward(deep, PROMPT[4:], view, SkipSet(), keep=None)
    assert torch.allclose(logits, full_logits(deep, PROMPT)[4:], atol=1e-4)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, cache.layers))


@pytest.mark.parametrize("name,settings", [
    ("swift", {"context_window": 6, "bayes_interval": 3}),  # the search runs, Bayesian proposals included
    ("layer_skip", {"speedup": 3.0}),
])
def test_self_speculation_equals_ar_and_counts_draft_passes_as_draft(deep, name, settings):
    ar_ctx = context(deep)
    expected = get_method("ar")().generate(ar_ctx)
    target, drafts = PassCounter(deep, "target"), PassCounter(deep, "self-draft", self_draft=True)
    try:
        ctx = context(deep)
        got = get_method(name)(**settings).generate(ctx)
    finally:
        target.remove()
        drafts.remove()
    assert got == expected
    assert len(ctx.trace.accepted) == target.calls and sum(ctx.trace.accepted) == len(got)
    assert drafts.calls > 0 and len(drafts.widths) == drafts.calls
    assert "draft_layer_fraction" not in ctx.extras  # the harness measures what a self-draft pass ran
    if name == "swift":
        assert ctx.extras["swift_search_iterations"] > 3 and "layer_set_search" in ctx.state


def test_swift_sampling_is_reproducible(deep):
    s = Sampling(temperature=1.0, seed=5)
    runs = [get_method("swift")(context_window=6).generate(context(deep, 16, sampling=s)) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 16


def test_uniform_skip_set_keeps_first_last_and_the_ratio():
    skip = uniform_skip_set(28, 2.0)
    kept = [i for i in range(28) if i not in skip.attention]
    assert len(kept) == 14 and kept[0] == 0 and kept[-1] == 27
    assert skip.attention == skip.mlp
    assert np.ptp(np.diff(kept)) <= 1  # evenly spread
    assert uniform_skip_set(28, 1.0) == SkipSet()
    with pytest.raises(ValueError):
        uniform_skip_set(28, 0.5)


def test_skip_set_naming_a_missing_layer_is_an_error(deep):
    with pytest.raises(ValueError, match="layers"):
        skipped_forward(deep, PROMPT, new_cache(deep), SkipSet.of([6]))


def test_state_bytes_measures_tensors_arrays_and_containers():
    table = torch.zeros(100, 8, dtype=torch.int32)
    assert state_bytes({"t": table}) >= 3200
    assert state_bytes([np.zeros(1000, dtype=np.float64)]) >= 8000
    assert state_bytes({}) < 1000
    shared = torch.zeros(1000)
    assert state_bytes([shared, shared]) < 2 * 4000  # one object counted once
    assert registered_state_bytes({}) == 0  # a method that registers nothing adds nothing
    assert 4000 <= registered_state_bytes({"a": shared, "b": [shared]}) < 2 * 4000  # shared across entries too


def test_dynamic_tree_adds_more_alternatives_where_the_draft_is_less_sure(deep):
    from methods.swift import dynamic_tree

    logits = torch.arange(20, dtype=torch.float32).repeat(2, 1)  # token 19 most likely
    dists = torch.softmax(logits, -1)
    tree = dynamic_tree(context(deep), [19, 3], logits, [0.99, 0.6])
    first = tree.children[ROOT]
    assert list(first) == [19, 18, 17]  # confidence > 0.95: 3 candidates, the chain's token first
    second = tree.children[first[19]]
    assert len(second) == 8 and next(iter(second)) == 3 and 19 in second  # > 0.5: 8 candidates under the chain
    sampled = dynamic_tree(context(deep, sampling=Sampling(temperature=1.0, seed=1)), [19], dists[:1], [0.3])
    assert len(sampled.children[ROOT]) == 10 and ROOT in sampled.dists  # draws without replacement from q


def test_swift_chain_mode_equals_ar(deep):
    expected = get_method("ar")().generate(context(deep, 24))
    assert get_method("swift")(dynamic_verification=False, context_window=6).generate(context(deep, 24)) == expected


@pytest.mark.parametrize("name,settings", [("swift", {}), ("swift", {"dynamic_verification": False}), ("layer_skip", {})])
def test_last_token_alone_after_a_rejection(deep, name, settings):
    for n in (2, 3, 5):  # short budgets reach the step where no draft fits (room 0)
        assert get_method(name)(**settings).generate(context(deep, n)) == get_method("ar")().generate(context(deep, n))
