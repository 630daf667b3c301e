"""Superposed Decoding: one superposed pass per token, k drafts, n-gram rescoring."""
from __future__ import annotations

from methods.base import DecodeContext, Sampling, get_method
from methods.common.ngram import NGramTable
from methods.superposed import ngram_prob
from tests.conftest import tiny_tokenizer

PROMPT = [4, 6, 9, 7, 8]


def decode(pair, tokenizer=None, max_new_tokens=12, eos=frozenset(), **settings):
    target, _ = pair
    ctx = DecodeContext(prompt_ids=PROMPT, target=target, sampling=Sampling(), max_new_tokens=max_new_tokens,
                        eos_token_ids=eos, tokenizer=tokenizer)
    return get_method("superposed")(**settings).generate(ctx), ctx


def test_one_draft_without_ngrams_is_greedy_decoding(pair):
    target, _ = pair
    expected = get_method("ar")().generate(DecodeContext(prompt_ids=PROMPT, target=target, sampling=Sampling(),
                                                         max_new_tokens=12, eos_token_ids=frozenset()))
    got, ctx = decode(pair, k=1, alpha=0.0)
    assert got == expected and ctx.alternatives == [expected]


def test_k_drafts_from_one_pass_per_token(pair):
    got, ctx = decode(pair, tokenizer=tiny_tokenizer(), k=3)
    assert len(ctx.alternatives) == 3 and got == ctx.alternatives[0]
    assert len({tuple(a) for a in ctx.alternatives}) == 3  # distinct drafts
    assert len(ctx.trace.accepted) == 12 and sum(ctx.trace.accepted) == len(got) == 12  # 12 passes for 12 tokens
    assert "ngram_models" in ctx.state


def test_a_draft_ending_in_eos_is_finished_and_may_be_chosen(pair):
    first, _ = decode(pair, k=3, alpha=0.0)
    got, ctx = decode(pair, k=3, alpha=0.0, eos=frozenset({first[4]}))
    assert all(len(a) <= 12 for a in ctx.alternatives)
    assert sum(ctx.trace.accepted) == len(got)
    assert got[-1] == first[4] or len(got) == 12


def test_ngram_interpolation_uses_the_orders_that_know_the_context():
    models = {n: NGramTable(n) for n in (2, 3)}
    for table in models.values():
        table.add([1, 2, 3, 1, 2, 4])
    assert ngram_prob(models, [9, 1, 2], 3) == 0.5  # bigram (2 -> 3: 1/2) and trigram (1,2 -> 3: 1/2)
    assert ngram_prob(models, [9, 9, 4], 1) is None


def test_decoding_stops_once_k_drafts_have_finished(pair):
    """One draft, no n-grams: greedy decoding, which ends at its first EOS instead of running to the length."""
    first, _ = decode(pair, k=1, alpha=0.0)
    got, ctx = decode(pair, k=1, alpha=0.0, eos=frozenset({first[4]}))
    assert got == first[: first.index(first[4]) + 1]
    assert len(ctx.trace.accepted) == len(got)  # one pass per token, none after the finish
