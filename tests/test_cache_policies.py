"""Cache and attention policies (methods/common/cache_policy.py and one file per paper), on tiny models:
what each keeps and at which positions, exact re-rotation, equality with `ar` when the budget covers
the sequence, the attention implementation restored, and the KV byte count."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from methods.base import (
    DecodeContext,
    Sampling,
    SettingError,
    describe_settings,
    get_method,
    get_policy,
    policies,
    registry,
)
from methods.common import kv
from methods.common.cache_policy import (
    ATTENTION_NAME,
    WithPolicy,
    compose,
    moved,
    moved_runs,
)
from methods.common.rope import Rotation
from methods.recycled_attention import top_keys
from tests.conftest import perturbed, tiny_llama

PROMPTS = [[4, 6, 9, 7, 8], [10, 11, 12, 10, 11, 12, 10, 11], [5, 20, 21, 22, 5, 5, 20, 21] * 3]


def small_rope(arch: str = "llama", theta: float = 50.0):
    """A tiny model whose RoPE turns fast (theta 50), so that a wrong rotation shows."""
    common = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 1024, "initializer_range": 0.3,
                  "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    return model.eval()


def layer0(model, tokens, positions=None):
    """Layer 0's cached keys and values of `tokens` (at `positions`): they depend on nothing else."""
    cache = kv.new_cache(model)
    ids = torch.tensor([tokens])
    extra = {} if positions is None else {"position_ids": torch.tensor([positions])}
    kv.forward(model, cache, input_ids=ids, **extra)
    return cache.layers[0].keys, cache.layers[0].values


def decode(spec, target, prompt, draft=None, max_new_tokens=24, **settings):
    ctx = DecodeContext(prompt_ids=prompt, target=target, draft=draft, sampling=Sampling(),
                        max_new_tokens=max_new_tokens, eos_token_ids=frozenset())
    return compose(spec, settings).generate(ctx)


# --- positions ---

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rerotated_keys_equal_keys_computed_at_the_new_positions(arch):
    model, rotation = small_rope(arch), None
    rotation = Rotation.of(model)
    tokens, old, new = [3, 9, 17, 4, 30, 8], [0, 1, 2, 3, 4, 5], [0, 7, 40, 41, 300, 301]
    keys_old, values_old = layer0(model, tokens, old)
    keys_new, values_new = layer0(model, tokens, new)
    moved_keys = rotation.rotate(keys_old, torch.tensor(new) - torch.tensor(old))
    assert not torch.allclose(keys_old, keys_new, atol=1e-2)  # the positions matter at theta 50
    torch.testing.assert_close(moved_keys, keys_new, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(values_old, values_new)
    # attention scores q.k of a query at position 350 (rotated by transformers itself) agree
    attn = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([[12]])))
    query = attn.q_proj(hidden).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hidden, torch.tensor([[350]]))
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    expand = attn.num_key_value_groups
    scores_moved = query @ moved_keys.repeat_interleave(expand, dim=1).transpose(-1, -2)
    scores_new = query @ keys_new.repeat_interleave(expand, dim=1).transpose(-1, -2)
    torch.testing.assert_close(scores_moved, scores_new, atol=1e-4, rtol=1e-5)


def test_moved_packs_slots_per_head_and_rerotates_each_by_its_own_shift():
    model = small_rope()
    tokens = [3, 9, 17, 4, 30, 8, 11, 2]
    keys, values = layer0(model, tokens)
    index = torch.tensor([[0, 3, 7], [1, 2, 6]])  # KV head 0 keeps slots 0,3,7; head 1 keeps 1,2,6
    got_k, got_v = moved(keys, values, index, Rotation.of(model))
    for head, slots in enumerate(index.tolist()):
        want_k, want_v = layer0(model, [tokens[s] for s in slots])  # those tokens at positions 0,1,2
        torch.testing.assert_close(got_k[:, head], want_k[:, head], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got_v[:, head], want_v[:, head])


def test_moving_runs_equals_moving_their_index():
    model = small_rope()
    keys, values = layer0(model, [3, 9, 17, 4, 30, 8, 11, 2])
    rotation = Rotation.of(model)
    by_runs = moved_runs(keys, values, (slice(0, 2), slice(5, 8)), rotation)
    by_index = moved(keys, values, torch.tensor([0, 1, 5, 6, 7]), rotation)
    for got, want in zip(by_runs, by_index):
        torch.testing.assert_close(got, want)


# --- streaming_llm ---

@pytest.mark.parametrize("arch,chunk", [("llama", 0), ("llama", 1), ("llama", 3), ("qwen2", 3)])
def test_streaming_llm_keeps_sinks_and_window_replaced_inside_the_cache(arch, chunk):
    """2 sinks + window 4 after 10 tokens: positions [0,1,6,7,8,9] held at slots [0..5]; whatever the prefill
    chunks, layer 0 then holds exactly those tokens' keys at positions 0..5."""
    model, tokens = small_rope(arch), [3, 9, 17, 4, 30, 8, 11, 2, 25, 40]
    policy = get_policy("streaming_llm")(sinks=2, window=4, prefill_chunk=chunk)
    keys, values = layer0(model, [tokens[i] for i in (0, 1, 6, 7, 8, 9)])
    keys_next, _ = layer0(model, [tokens[i] for i in (0, 1, 7, 8, 9)] + [50])
    cache = kv.new_cache(model)
    with policy.attach(model):
        kv.extend(model, tokens, cache, keep=1)
        assert cache.get_seq_length() == 6 and all(layer.keys.shape[-2] == 6 for layer in cache.layers)
        torch.testing.assert_close(cache.layers[0].keys, keys, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[0].values, values)
        # the next token goes in at position 6 (the cache length), then moves to slot 5 with the others
        kv.extend(model, [50], cache)
        torch.testing.assert_close(cache.layers[0].keys, keys_next, atol=2e-5, rtol=1e-5)


def test_streaming_llm_under_sps_never_holds_more_than_its_budget():
    target = tiny_llama(seed=0)
    draft = perturbed(target, 0.3, seed=1)
    held: list[int] = []
    with_policy = compose("sps+streaming_llm", {"streaming_llm": {"sinks": 2, "window": 10, "prefill_chunk": 4}})
    assert isinstance(with_policy, WithPolicy) and with_policy.name == "sps+streaming_llm"
    ctx = DecodeContext(prompt_ids=PROMPTS[2], target=target, draft=draft, sampling=Sampling(), max_new_tokens=30,
                        eos_token_ids=frozenset())
    original = kv.extend_once

    def spy(model, tokens, cache, keep=None):  # the cache after each target pass, eviction included
        out = original(model, tokens, cache, keep)
        if model is target:
            held.append(cache.get_seq_length())
        return out

    kv.extend_once = spy
    try:
        out = with_policy.generate(ctx)
    finally:
        kv.extend_once = original
    assert len(out) == 30 and max(held) == 12 and held[:6] == [4, 8, 12, 12, 12, 12]


# --- recycled_attention ---

def test_top_keys_pools_then_takes_the_max_over_a_group():
    probs = torch.tensor([[[.1, .5, 0, 0, 0, 0, 0, .4],
                           [0, 0, 0, .9, 0, 0, .1, 0]]])  # one KV head, two query heads
    assert top_keys(probs, 2, pool=1).tolist() == [[1, 3]]  # max over the group: .1 .5 0 .9 0 0 .1 .4
    assert top_keys(probs, 3, pool=3).tolist() == [[2, 3, 4]]  # pooled: .5 .5 .9 .9 .9 .1 .4 .4
    assert top_keys(probs, 5, pool=3).tolist() == [[0, 1, 2, 3, 4]]
    assert top_keys(probs, 99, pool=3).shape == (1, 8)


def test_recycled_attention_chooses_the_last_prompt_tokens_top_keys_and_recycles_them():
    model = tiny_llama(seed=0)
    prompt = PROMPTS[2][:12]
    # the prompt's last query's attention, from transformers' eager attention
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        attentions = model(torch.tensor([prompt]), output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    policy = get_policy("recycled_attention")(k=3, stride=3, pool=1)
    cache = kv.new_cache(model)
    with policy.attach(model, record=True) as run:
        logits = kv.extend(model, prompt, cache, keep=1)
        for layer, probs in enumerate(attentions):
            last = probs[0, :, -1, :].view(2, 2, -1).amax(dim=1)  # [kv heads, 12]: max over each group
            want = last.topk(3, dim=-1).indices.sort(dim=-1).values
            assert torch.equal(run.state["chosen"][layer], want)
        steps = []
        for _ in range(5):
            logits = kv.extend(model, [int(logits[-1].argmax())], cache)
            steps.append(run.attended[0])
    chosen = run.state["chosen"]  # chosen again at step 3 (a full step over 15 keys)
    assert steps[0].shape == (2, 4) and steps[0][:, 3].tolist() == [12, 12]  # K keys + the new token
    assert steps[1].shape == (2, 5) and steps[1][:, 3:].tolist() == [[12, 13], [12, 13]]
    assert torch.equal(steps[2], torch.arange(15))  # step 3: full attention
    assert torch.equal(steps[3][:, :3], chosen[0]) and steps[3][:, 3].tolist() == [15, 15]
    assert steps[4][:, 3:].tolist() == [[15, 16], [15, 16]]


# --- infllm ---

def test_infllm_attends_init_one_retrieved_unit_the_tokens_past_the_units_and_the_window():
    """n_init 2, units of 2, window 4: after 12 tokens the units are [2,3] [4,5] [6,7] (8.. not yet: a unit
    joins once all of it has left the window). The 13th token (position 12) attends 0,1 (init), one unit
    (topk 1), 8 (past the window, not in a unit) and 9..12 (its window)."""
    model = tiny_llama(seed=0)
    tokens = PROMPTS[2][:12]
    settings = {"n_init": 2, "n_local": 4, "block_size": 2, "topk": 1, "repr_topk": 1, "prefill_chunk": 1}
    cache = kv.new_cache(model)
    with get_policy("infllm")(**settings).attach(model, record=True) as run:
        kv.extend(model, tokens, cache)
        assert [run.state["memory"][layer]["repr"].shape for layer in (0, 1)] == [(3, 4, 16)] * 2
        kv.extend(model, [7], cache)
        for layer in (0, 1):
            seen = run.attended[layer].tolist()
            assert seen[:2] == [0, 1] and seen[4:] == [8, 9, 10, 11, 12]
            assert seen[2:4] in ([2, 3], [4, 5], [6, 7])
    with get_policy("infllm")(**{**settings, "topk": 3}).attach(model, record=True) as run:
        kv.extend(model, tokens + [7], kv.new_cache(model))
        assert run.attended[0].tolist() == list(range(13))  # every unit retrieved


def test_infllm_representative_key_is_the_units_most_attended_key_at_position_zero():
    model = small_rope()
    tokens = [3, 9, 17, 4, 30, 8, 11, 2, 25, 40]
    cache = kv.new_cache(model)
    with get_policy("infllm")(n_init=2, n_local=4, block_size=2, topk=1, repr_topk=1, prefill_chunk=1).attach(model) as run:
        kv.extend(model, tokens, cache)
        memory = run.state["memory"][0]
        assert memory["repr"].shape[0] == 2  # units [2,3] and [4,5]
        unrotated = Rotation.of(model).rotate(cache.layers[0].keys[0], -torch.arange(10))  # [kv heads, 10, d]
        for unit, first in enumerate((2, 4)):
            for head in range(4):
                best = first + int(memory["received"][head, first:first + 2].argmax())
                torch.testing.assert_close(memory["repr"][unit, head], unrotated[head // 2, best])


# --- every policy ---

BIG_BUDGETS = {
    "streaming_llm": [{"sinks": 4, "window": 500, "prefill_chunk": 3}],
    "recycled_attention": [{"k": 500, "stride": 3}, {"k": 500, "stride": 2, "prefill_chunk": 4}],
    "infllm": [{"n_local": 500, "prefill_chunk": 4}],
}


def test_every_policy_has_big_budget_settings_here():
    assert set(BIG_BUDGETS) == set(policies())


@pytest.mark.parametrize("name,settings", [(n, s) for n, cases in BIG_BUDGETS.items() for s in cases])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_ar_when_the_budget_covers_the_sequence(name, settings, prompt, pair):
    target, draft = pair
    expected = decode("ar", target, prompt)
    assert decode(name, target, prompt, **{name: settings}) == expected
    assert decode(f"sps+{name}", target, prompt, draft=draft, **{name: settings}) == expected


@pytest.mark.parametrize("name,settings", [(n, cases[0]) for n, cases in BIG_BUDGETS.items()])
def test_qwen2_greedy_output_equals_ar_when_the_budget_covers_the_sequence(name, settings):
    model = small_rope("qwen2", theta=10000.0)
    expected = decode("ar", model, PROMPTS[2])
    assert decode(name, model, PROMPTS[2], **{name: settings}) == expected


def test_small_budgets_change_the_output():
    """The tests above would pass for a policy that does nothing: under a small budget each one must act."""
    model, prompt = tiny_llama(seed=0), PROMPTS[2]
    expected = decode("ar", model, prompt)
    assert decode("streaming_llm", model, prompt, streaming_llm={"sinks": 1, "window": 3}) != expected
    assert decode("recycled_attention", model, prompt, recycled_attention={"k": 2, "stride": 5}) != expected
    assert decode("infllm", model, prompt, infllm={"n_init": 1, "n_local": 4, "block_size": 2, "topk": 1,
                                                       "repr_topk": 1, "prefill_chunk": 2}) != expected


@pytest.mark.parametrize("original", ["sdpa", "eager"])
def test_attention_function_is_restored_on_exit_and_on_exception(original):
    model = tiny_llama(seed=0)
    model.set_attn_implementation(original)
    policy = get_policy("recycled_attention")(k=2)
    with policy.attach(model):
        assert model.config._attn_implementation == ATTENTION_NAME
        assert model.model.layers[0].self_attn.config._attn_implementation == ATTENTION_NAME
    assert model.config._attn_implementation == original
    with pytest.raises(RuntimeError, match="boom"), policy.attach(model):
        kv.extend(model, [4, 5, 6], kv.new_cache(model))
        raise RuntimeError("boom")
    assert model.config._attn_implementation == original
    assert not model._forward_hooks and not model._forward_pre_hooks and not kv._chunkers
    cache = kv.new_cache(model)  # and the model runs as before
    torch.testing.assert_close(kv.extend(model, [4, 5, 6], cache), kv.extend_once(model, [4, 5, 6], kv.new_cache(model)))


def test_chunked_prefill_returns_the_same_logits_as_one_pass():
    model, tokens = tiny_llama(seed=0), PROMPTS[2]
    plain = kv.extend(model, tokens, kv.new_cache(model))
    policy = get_policy("streaming_llm")(window=500, prefill_chunk=5)
    with policy.attach(model) as run:
        torch.testing.assert_close(kv.extend(model, tokens, kv.new_cache(model), keep=7), plain[-7:], atol=1e-5,
                                   rtol=1e-5)
        assert run.passes == 5  # 24 tokens in chunks of 5
    with policy.attach(model):
        torch.testing.assert_close(kv.extend(model, tokens, kv.new_cache(model)), plain, atol=1e-5, rtol=1e-5)


def test_evicting_policies_refuse_explicit_position_ids():
    model = tiny_llama(seed=0)
    with get_policy("streaming_llm")().attach(model), pytest.raises(NotImplementedError, match="position ids"):
        kv.forward(model, kv.new_cache(model), input_ids=torch.tensor([[4, 5]]), position_ids=torch.tensor([[0, 1]]))


def test_kv_bytes_counts_keys_and_values_of_every_layer():
    model = tiny_llama(seed=0)  # 2 layers, 2 KV heads of 16, float32
    cache = kv.new_cache(model)
    assert kv.kv_bytes(cache) == 0
    kv.extend(model, [4, 5, 6, 7, 8], cache)
    assert kv.kv_bytes(cache) == 2 * 2 * (2 * 5 * 16) * 4  # layers x (keys, values) x heads*tokens*dim x bytes
    half = DynamicCache()
    half.update(torch.zeros(1, 3, 7, 8, dtype=torch.bfloat16), torch.zeros(1, 3, 7, 8, dtype=torch.bfloat16), 0)
    assert kv.kv_bytes(half) == 2 * 3 * 7 * 8 * 2
    with get_policy("streaming_llm")(sinks=1, window=2).attach(model):
        kv.extend(model, [9, 10], cache)
    assert kv.kv_bytes(cache) == 2 * 2 * (2 * 3 * 16) * 4


# --- registry and settings ---

def test_policies_have_their_own_registry_and_compose_with_decoders():
    assert set(policies()) == {"streaming_llm", "recycled_attention", "infllm"}
    assert not set(policies()) & set(registry())
    assert compose("streaming_llm").name == "ar+streaming_llm"
    assert compose("sps+infllm").decoder.name == "sps"
    assert compose("ar").name == "ar" and not isinstance(compose("ar"), WithPolicy)
    assert not compose("streaming_llm").lossless
    with pytest.raises(SettingError, match="not a cache policy"):
        compose("sps+pld")
    with pytest.raises(SettingError, match="one cache policy"):
        compose("streaming_llm+infllm")


@pytest.mark.parametrize("name", sorted(policies()))
def test_every_policy_cites_its_paper_and_has_help_and_valid_defaults(name):
    cls = get_policy(name)
    assert cls.paper and cls.paper.arxiv and cls.__module__ != "methods.common.cache_policy"
    cls()
    for row in describe_settings(cls.Config):
        assert row["help"], f"{name}.{row['name']} has no help"
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    for field in fields.values():
        low = field.metadata.get("low")
        if low is not None:
            with pytest.raises(SettingError, match=rf"{name}\.{field.name}"):
                cls(**{field.name: str(int(low) - 1)})


@pytest.mark.parametrize("bad", [{"prefill_chunk": 2000}, {"repr_topk": 200}, {"prefill_chunk": 0}])
def test_infllm_rejects_inconsistent_settings(bad):
    with pytest.raises(SettingError):
        get_policy("infllm")(**bad)


def test_recycled_attention_rejects_an_even_pool():
    with pytest.raises(SettingError, match="pool"):
        get_policy("recycled_attention")(pool=4)


def test_ar_itself_is_untouched_by_the_policy_registry():
    assert get_method("ar") is registry()["ar"]


def test_bf16_keys_are_moved_from_their_originals_so_they_do_not_drift():
    """bf16, token by token, a window of 64: every window key moves up to 64 times. Each key then equals the
    key computed at its final position within about one bf16 rounding (0.6% at worst); moving moved keys
    instead drifts (slow rotations round away: 5% at worst here, 34% with a window of 256)."""
    model = small_rope(theta=10000.0).to(torch.bfloat16)
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (140,)).tolist()
    cache = kv.new_cache(model)
    with get_policy("streaming_llm")(sinks=2, window=64, prefill_chunk=1).attach(model) as run:
        kv.extend(model, tokens, cache)
    want, _ = layer0(model, tokens[:2] + tokens[-64:])
    error = (cache.layers[0].keys.float() - want.float()).norm(dim=-1) / want.float().norm(dim=-1)
    assert error.max() < 0.02
    assert run.extra_bytes() == 2 * (2 * 66 * 16 * 2 + 2 * 66 * 8)  # layers x (bf16 keys + int64 positions)
