"""TriForce (methods/triforce.py) on tiny models: lossless under greedy decoding with retrieval and eviction
really happening, the hierarchical verification rule against the exact distribution, the retrieval cache's
chunks and positions checked by hand, the draft's StreamingLLM budget, and how the harness counts it."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from harness.instrument import PassCounter
from harness.runner import Runner
from methods.base import DecodeContext, Sampling, SettingError, get_method
from methods.common.kv import extend, forward, new_cache
from methods.common.rope import Rotation
from methods.common.verify import residual, verify_speculative
from methods.triforce import (
    Levels,
    RetrievalCache,
    TriForce,
    chunk_order,
    last_queries,
    retrieval_sample,
)
from tests.conftest import perturbed, tiny_llama
from tests.test_verification_rule import V, assert_matches

DRAWS = 6000
SMALL = {"budget": 48, "chunk": 4, "sinks": 4, "window": 40}  # retrieval keeps 48 of 200-300 prompt tokens
SETTINGS = [SMALL, {**SMALL, "gamma1": 1, "gamma2": 3},
            {"budget": 40, "chunk": 8, "sinks": 2, "window": 20, "gamma1": 3, "gamma2": 8}]
GREEDY = Sampling()


def prompts(n: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(4, 55, (length,), generator=g).tolist() for length in (203, 256, 301)[:n]]


@pytest.fixture(scope="module")
def close_pair():
    """A target whose attention adds little to the residual stream (o_proj scaled by 0.01), so that a partial
    cache changes its logits only a little, and a draft close to it: both levels accept often and reject
    sometimes. (On the plain tiny models any dropped context changes the argmax: nearly every token is
    rejected at both levels.)"""
    target = tiny_llama(seed=0)
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
    return target, perturbed(target, 0.05, seed=1)


def decode(name, pair, prompt, max_new_tokens=24, sampling=GREEDY, eos=frozenset({1}), **settings):
    target, draft = pair
    ctx = DecodeContext(prompt_ids=list(prompt), target=target, draft=draft, sampling=sampling,
                        max_new_tokens=max_new_tokens, eos_token_ids=eos)
    return get_method(name)(**settings).generate(ctx), ctx


# --- lossless under greedy decoding --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(close_pair):
    """`ar` and triforce on every prompt x setting: {(prompt index, setting index): (ar's, triforce's, ctx)}."""
    out = {}
    for i, prompt in enumerate(prompts()):
        expected, _ = decode("ar", close_pair, prompt, max_new_tokens=32, eos=frozenset())
        for j, settings in enumerate(SETTINGS):
            got, ctx = decode("triforce", close_pair, prompt, max_new_tokens=32, eos=frozenset(), **settings)
            out[i, j] = expected, got, ctx
    return out


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
@pytest.mark.parametrize("index", range(3))
def test_greedy_output_equals_ar_with_retrieval_and_eviction(runs, setting, index):
    expected, got, ctx = runs[index, setting]
    assert got == expected
    assert sum(ctx.trace.accepted) == len(got) and ctx.trace.proposed[0] == 0  # the prefill pass emits one


@pytest.mark.parametrize("settings", SETTINGS[::2])
def test_greedy_output_equals_ar_when_almost_everything_is_rejected(pair, settings):
    prompt = prompts(1)[0]
    got, ctx = decode("triforce", pair, prompt, max_new_tokens=12, **settings)
    assert got == decode("ar", pair, prompt, max_new_tokens=12)[0]
    assert ctx.extras["draft_acceptance"] < 0.2 and max(ctx.trace.accepted[1:]) <= 2


def test_every_path_is_exercised_at_both_levels(runs):
    """Over the prompts and settings above: level 1 accepted and rejected, level 3 accepting every level-2
    token (plus its bonus) and rejecting one."""
    draft_rates, retrieval_rates, full, short = [], [], 0, 0
    for _, _, ctx in runs.values():
        draft_rates.append(ctx.extras["draft_acceptance"])
        retrieval_rates.append(ctx.extras["retrieval_acceptance"])
        steps = list(zip(ctx.trace.proposed, ctx.trace.accepted))[1:-1]  # the last may be cut by the budget
        full += sum(a == p + 1 for p, a in steps)
        short += sum(a <= p for p, a in steps)
    assert 0 < min(draft_rates) and max(draft_rates) < 1
    assert 0 < min(retrieval_rates) and max(retrieval_rates) < 1
    assert full > 0 and short > 0


def test_identical_models_and_a_budget_covering_everything_accept_every_token():
    target = tiny_llama(seed=0)
    twins, prompt = (target, copy.deepcopy(target)), prompts(1)[0]
    got, ctx = decode("triforce", twins, prompt, max_new_tokens=22, eos=frozenset(),
                      budget=512, gamma1=2, gamma2=6, window=400)
    assert got == decode("ar", twins, prompt, max_new_tokens=22, eos=frozenset())[0]
    assert ctx.trace.accepted == [1, 7, 7, 7] and ctx.trace.proposed == [0, 6, 6, 6]
    assert ctx.extras["draft_acceptance"] == ctx.extras["retrieval_acceptance"] == 1.0


def test_sampling_is_reproducible_and_the_trace_adds_up(close_pair):
    s = Sampling(temperature=0.8, top_p=0.95, seed=3)
    first, ctx = decode("triforce", close_pair, prompts(1)[0], sampling=s, **SMALL)
    assert decode("triforce", close_pair, prompts(1)[0], sampling=s, **SMALL)[0] == first
    assert sum(ctx.trace.accepted) == len(first) > 0


# --- the verification rule -----------------------------------------------------------------------------------

def triforce_sequence(p, p_r, q, first, gamma1, gamma2, length, generator):
    """TriForce's rounds on Markov tables over V tokens (a table's row is the distribution after a token):
    the draft q proposes gamma1 tokens, `retrieval_sample` checks them against p_r until gamma2 tokens are
    out, level 3 verifies those against p with the level-2 distributions (what `verify` does under
    sampling). Returns the first `length` tokens emitted."""
    out, last = [], first
    while len(out) < length:
        tokens, rows = [], []
        while len(tokens) < gamma2:
            drafts, qs, prev = [], [], ([last] + tokens)[-1]
            for _ in range(gamma1):
                drafts.append(int(torch.multinomial(q[prev], 1, generator=generator)))
                qs.append(q[prev])
                prev = drafts[-1]
            context = ([last] + tokens)[-1:] + drafts
            emitted, dists = retrieval_sample(drafts, torch.stack(qs), p_r[context], generator)
            tokens += emitted
            rows.append(dists)
        accepted, token = verify_speculative(tokens, torch.cat(rows), p[[last] + tokens], generator)
        out += tokens[:accepted] + [token]
        last = out[-1]
    return tuple(out[:length])


def toy_tables():
    """Full target p, retrieval-cache target p_r and draft q over V tokens: three different distributions,
    none too peaked (every 3-token sequence has an expected count the chi-square test can use)."""
    g = torch.Generator().manual_seed(3)
    p, p_r, q = (torch.randn(V, V, generator=g).softmax(-1) for _ in range(3))
    return p, p_r, q


@pytest.mark.parametrize("gamma1,gamma2", [(1, 2), (2, 3)])
def test_hierarchical_rule_gives_exactly_the_full_targets_distribution(gamma1, gamma2):
    p, p_r, q = toy_tables()
    assert (p_r - p).abs().max() > 0.2 and (q - p_r).abs().max() > 0.2
    assert_matches(p, 1, lambda g: triforce_sequence(p, p_r, q, 1, gamma1, gamma2, 3, g), draws=DRAWS)


def test_the_toy_check_catches_a_wrong_level_3_distribution(monkeypatch):
    """The same check fails when level 3 takes a correction's residual as its distribution (a plausible
    mistake): the check has the power to see it."""
    p, p_r, q = toy_tables()
    right = retrieval_sample

    def residual_for_corrections(drafts, draft_probs, p_rows, generator):
        tokens, rows = right(drafts, draft_probs, p_rows, generator)
        if len(tokens) <= len(drafts):  # the last token is a correction
            rows = rows.clone()
            rows[-1] = residual(rows[-1], draft_probs[len(tokens) - 1])
        return tokens, rows

    monkeypatch.setattr(sys.modules[__name__], "retrieval_sample", residual_for_corrections)
    with pytest.raises(AssertionError, match="differs"):
        assert_matches(p, 1, lambda g: triforce_sequence(p, p_r, q, 1, 2, 3, 3, g), draws=DRAWS)


# --- the retrieval cache -------------------------------------------------------------------------------------

def test_chunk_order_keeps_chunk_zero_then_the_best_by_query_dot_mean_key():
    # 2 KV heads, 2 query heads each, 5 chunks of 2 keys; head 0 scores on dim 0, head 1 on dim 1
    means = torch.tensor([[[0.0, 0], [1, 0], [3, 0], [2, 0], [-1, 0]],
                          [[9.0, 0], [0, 5], [0, -1], [0, 2], [0, 4]]])  # [kv_heads, chunks, d]
    spread = torch.tensor([[0.5, -0.5], [-0.5, 0.5]])  # two keys per chunk with the chunk's mean
    keys = (means[:, :, None, :] + spread[None, None]).reshape(2, 10, 2)
    query = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 2]])  # heads 0-1 -> KV head 0, heads 2-3 -> KV head 1
    # head 0: scores 2 * (0, 1, 3, 2, -1); head 1: 3 * (0, 5, -1, 2, 4); chunk 0 first whatever its score
    assert chunk_order(keys, query, 2, 3).tolist() == [[0, 2, 3], [0, 1, 4]]
    assert chunk_order(keys, query, 2, 9).tolist() == [[0, 2, 3, 1, 4], [0, 1, 4, 3, 2]]


FAST_ROPE = {"rope_type": "default", "rope_theta": 50.0}  # positions matter: a wrong one shows


def tiny_qwen(kv_heads: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=55, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         rope_parameters=FAST_ROPE, initializer_range=0.3, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def test_retrieval_cache_holds_the_chunks_the_last_prompt_query_scores_highest():
    """The last query computed here from the layers' own modules (norm, q_proj with its bias, the model's
    rotary embedding); the selection and the view's keys checked against it."""
    model, prompt, chunk, budget = tiny_qwen(), prompts(1)[0][:150], 8, 48
    full = new_cache(model)
    with last_queries(model) as queries:
        extend(model, prompt, full, keep=1)
    retrieval = RetrievalCache(full, queries, Rotation.of(model), chunk, budget)
    length, start = len(prompt), len(prompt) // chunk * chunk  # 150: 18 chunks and a tail of 6
    with torch.inference_mode():
        hidden = model(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        cos, sin = model.model.rotary_emb(hidden[0], torch.tensor([[length - 1]]))
    view = retrieval.view(full, model)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        with torch.inference_mode():
            q = attn.q_proj(layer.input_layernorm(hidden[i][:, -1:])).view(1, 1, 4, 16).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        keys = full.layers[i].keys[0]  # [2, 150, 16]
        means = keys[:, :start].reshape(2, start // chunk, chunk, 16).mean(2)
        score = torch.einsum("kgd,kcd->kc", q[0, :, 0].view(2, 2, 16), means)
        recent = length - start  # the tail of 6 stays; 48 - 6 = 42 entries of chunks: 5 whole and 2 of a sixth
        for head in range(2):
            best = [0] + (score[head, 1:].argsort(descending=True)[:5] + 1).tolist()
            want = [c * chunk + j for c in best[:5] for j in range(chunk)] + [best[5] * chunk, best[5] * chunk + 1]
            got = retrieval.positions(i, length)[head]
            assert sorted(got[:-recent].tolist()) == sorted(want)
            assert got[-recent:].tolist() == list(range(start, length))
            assert torch.equal(view.layers[i].keys[0, head], keys[head, got])  # stored at their original positions
    assert view.get_seq_length() == budget


def test_generated_tokens_replace_the_lowest_ranked_chunks_and_chunk_zero_stays():
    model, prompt = tiny_qwen(), prompts(1)[0][:64]
    full = new_cache(model)
    with last_queries(model) as queries:
        extend(model, prompt, full, keep=1)
    retrieval = RetrievalCache(full, queries, Rotation.of(model), 8, 32)  # chunk 0 + 3 best
    ranked = retrieval.order[0][0].tolist()
    extend(model, [7] * 10, full)  # 10 generated tokens: 22 chunk entries left, 2 whole chunks and 6 of the third
    got = retrieval.positions(0, 74)[0].tolist()
    assert got[:22] == [c * 8 + j for c in ranked[:2] for j in range(8)] + [ranked[2] * 8 + j for j in range(6)]
    assert got[22:] == list(range(64, 74))
    extend(model, [7] * 40, full)  # more recent tokens than the budget: chunk 0 and the 24 newest
    assert retrieval.positions(0, 114)[0].tolist() == list(range(8)) + list(range(90, 114))


def test_a_retrieval_pass_equals_full_attention_masked_to_the_kept_positions():
    """One KV head, so one set of kept positions per layer: the retrieval pass (kept keys at their original
    positions, new tokens at their true positions) must give the logits of a full-cache pass whose mask
    hides everything else."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=55, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, rope_parameters=FAST_ROPE,
                         initializer_range=0.3, tie_word_embeddings=False)
    model, prompt, new = LlamaForCausalLM(config).eval(), prompts(1)[0][:100], [9, 12, 30]
    full = new_cache(model)
    with last_queries(model) as queries:
        extend(model, prompt, full, keep=1)
    retrieval = RetrievalCache(full, queries, Rotation.of(model), 4, 24)
    kept = [set(retrieval.positions(i, 100)[0].tolist()) for i in range(2)]
    assert kept[0] != kept[1]  # layers choose differently: the reference masks layer by layer
    ids, at = torch.tensor([new]), torch.arange(100, 103)[None]
    got = forward(model, retrieval.view(full, model), input_ids=ids, position_ids=at).logits[0]

    masks = [torch.zeros(1, 1, 3, 103, dtype=torch.bool) for _ in kept]
    for mask, positions in zip(masks, kept):
        mask[..., sorted(positions)] = True
        mask[..., 100:] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda module, args, kwargs, mask=mask: (args, {**kwargs, "attention_mask": mask}), with_kwargs=True)
        for layer, mask in zip(model.model.layers, masks)]
    try:
        want = forward(model, full, input_ids=ids).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.allclose(got, want, atol=1e-5)


# --- the draft's StreamingLLM cache --------------------------------------------------------------------------

@pytest.mark.parametrize("settings", SETTINGS)
def test_the_drafts_cache_never_exceeds_sinks_plus_window(close_pair, settings):
    _, draft = close_pair
    held = []
    hook = draft.register_forward_pre_hook(lambda m, args, kwargs: held.append(
        (kwargs.get("cache") or kwargs.get("past_key_values")).get_seq_length()), with_kwargs=True)
    try:
        decode("triforce", close_pair, prompts(1)[0], max_new_tokens=16, eos=frozenset(), **settings)
    finally:
        hook.remove()
    budget = settings["sinks"] + settings["window"]
    assert max(held) == budget  # filled, then evicted back after every pass


# --- counting -------------------------------------------------------------------------------------------------

def test_harness_counts_retrieval_passes_as_self_draft_passes_and_the_trace_agrees(close_pair):
    target, draft = close_pair
    counters = [PassCounter(target, "target"), PassCounter(target, "self-draft", self_draft=True),
                PassCounter(draft, "draft")]
    passes = []
    hook = target.register_forward_pre_hook(lambda m, args, kwargs: passes.append(kwargs.get("position_ids")),
                                            with_kwargs=True)
    try:
        _, ctx = decode("triforce", close_pair, prompts(1)[0], **SMALL)
    finally:
        hook.remove()
        for counter in counters:
            counter.remove()
    full, own, drafted = (c.calls for c in counters)
    retrieval = sum(p is not None for p in passes)  # only retrieval passes give explicit positions
    assert full == len(ctx.trace.accepted) and own == retrieval > 0 and full + own == len(passes)
    assert counters[1].unskipped == own  # flagged as "skipped no sublayer": priced as full target passes
    assert drafted > 0 and Runner._check_trace(ctx, full) is None


def test_levels_keep_the_full_cache_one_behind_the_output(close_pair):
    target, draft = close_pair
    ctx = DecodeContext(prompt_ids=prompts(1)[0], target=target, draft=draft, sampling=Sampling(),
                        max_new_tokens=16, eos_token_ids=frozenset())
    from methods.streaming_llm import StreamingLLM
    with StreamingLLM(sinks=4, window=40).attach(draft):
        levels = Levels(ctx, TriForce.Config(**SMALL))
        levels.prefill()
        while not ctx.done:
            levels.step()
            assert levels.full.get_seq_length() == len(ctx.prompt_ids) + len(ctx.output) - 1
            assert levels.pending == ctx.output[-1]


@pytest.mark.parametrize("bad", [{"budget": 8, "chunk": 8}, {"window": 8, "gamma1": 2, "gamma2": 6}, {"gamma1": 0}])
def test_inconsistent_settings_are_refused(bad):
    with pytest.raises(SettingError):
        TriForce(**bad)


def test_the_draft_must_be_another_model():
    target = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="other than the target"):
        decode("triforce", (target, target), [4, 5, 6])
