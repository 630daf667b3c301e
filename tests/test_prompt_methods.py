"""Methods that restructure the prompt from the suite's item meta: jrt_prompt (longctx) and rdsca (icl)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, SPECIALS, tiny_llama, tiny_tokenizer
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from methods.ar import Autoregressive
from methods.base import DecodeContext, Sampling
from methods.jrt_prompt import JustReadTwice, jrt_prompt_ids
from methods.rdsca import (
    RepeatedDemonstrations,
    ReplayKV,
    additive,
    label_loglikelihoods,
    replay,
    replay_for,
    sliding_causal_mask,
)
from suites.base import get_suite
from suites.sizing import PromptFormat

SMOLLM2 = Path(os.path.expanduser("~/.cache/decodebench/smollm2-135m"))


def byte_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """Byte-level, no merges: every text decodes back to itself (the tiny word-level tokenizer drops
    newlines and punctuation, which JRT's prompt must keep)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                  additional_special_tokens=["<user>", "<assistant>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def context(ids, model, tokenizer=None, meta=None, max_new_tokens=6, eos=frozenset()) -> DecodeContext:
    return DecodeContext(prompt_ids=list(ids), target=model, sampling=Sampling(), max_new_tokens=max_new_tokens,
                         eos_token_ids=eos, tokenizer=tokenizer, item_meta=meta)


# ---------------------------------------------------------------- jrt_prompt

USER = "Find the code.\n\nNote: blue is 42. The sky is grey.\n\nWhat is blue?"
CONTEXT = "Note: blue is 42. The sky is grey."
PREFIX = "Blue is:"
JRT_USER = ("Find the code.\n\nWhat is blue? Note: blue is 42. The sky is grey.\n"
            "Note: blue is 42. The sky is grey. What is blue?")


@pytest.mark.parametrize("chat", [False, True])
def test_jrt_prompt_is_the_release_layout_by_hand(chat):
    tok = byte_tokenizer(chat)
    fmt = PromptFormat(tok, chat=chat)
    start = USER.index(CONTEXT)
    meta = {"context_span": [start, start + len(CONTEXT)], "answer_prefix": PREFIX}
    ids = jrt_prompt_ids(context(fmt.ids(fmt.text(USER, PREFIX)), None, tok, meta))
    expected = (f"<user> {JRT_USER} <assistant> {PREFIX}" if chat else f"{JRT_USER}\n{PREFIX}")
    assert tok.decode(ids) == expected
    assert ids == fmt.ids(expected)


def test_jrt_prompt_refuses_an_item_without_a_marked_context():
    tok = byte_tokenizer(chat=False)
    for meta in (None, {"task": "writing"}):
        with pytest.raises(ValueError, match=r"context_span.*plain chat item"):
            jrt_prompt_ids(context(tok("hello")["input_ids"], None, tok, meta))


def test_jrt_prompt_refuses_ids_it_cannot_turn_back_into_text():
    tok = tiny_tokenizer()  # word-level: 'Note:' is <unk>, newlines vanish
    meta = {"context_span": [0, 4], "answer_prefix": ""}
    with pytest.raises(ValueError, match="do not decode"):
        jrt_prompt_ids(context(tok("<user> Note: the cat <assistant> ")["input_ids"], None, tok, meta))


def test_jrt_prompt_decodes_as_ar_on_the_transformed_prompt():
    tok = byte_tokenizer(chat=True)
    model = tiny_llama(vocab_size=len(tok), seed=4)
    fmt = PromptFormat(tok, chat=True)
    start = USER.index(CONTEXT)
    meta = {"context_span": [start, start + len(CONTEXT)], "answer_prefix": PREFIX}
    ids = fmt.ids(fmt.text(USER, PREFIX))
    ctx = context(ids, model, tok, meta, max_new_tokens=8)
    out = JustReadTwice().generate(ctx)
    jrt_ids = fmt.ids(fmt.text(JRT_USER, PREFIX))
    assert out == Autoregressive().generate(context(jrt_ids, model, tok, max_new_tokens=8)) and len(out) == 8
    assert ctx.extras == {"jrt_prompt_tokens": len(jrt_ids), "jrt_extra_tokens": len(jrt_ids) - len(ids)}
    assert len(jrt_ids) - len(ids) == len(JRT_USER) - len(USER) == 48  # one token a byte


def test_jrt_prompt_on_every_longctx_task_with_smollm2():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip("smollm2-135m not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    suite = get_suite("longctx")(tokenizer=tok, lengths="1024", depths="50")
    for item in suite.items():
        user, (a, b), prefix = item.turns[0], item.meta["context_span"], item.meta["answer_prefix"]
        question = user[b:].strip()
        ids = jrt_prompt_ids(context(suite.prompt_ids(item), None, tok, item.meta))
        text = tok.decode(ids)
        assert text == suite.format.text(f"{user[:a]}{question} {user[a:b]}\n{user[a:b]} {question}", prefix)
        assert text.count(user[a:b]) == 2 and text.endswith(f"{question}{suite.format.tail}{prefix}")


# ---------------------------------------------------------------- rdsca

# prefix P, d1 = a1 a2 + separator S, d2 = b1 + S, d3 = c1 c2 + S, query q1 q2
P, A1, A2, S, B1, C1, C2, Q1, Q2 = 5, 10, 11, 9, 12, 13, 14, 15, 16
PROMPT = [P, A1, A2, S, B1, S, C1, C2, S, Q1, Q2]
SPANS, QUERY = [[1, 3], [4, 5], [6, 8]], [9, 11]
# prefill: P | d2' d3' | d1 d2 d3 | query; rows = queries, columns = keys, '1' = attends
MASK = """
1...............
11..............
111.............
1111............
11111...........
111111..........
1111111.........
11111111........
111111111.......
1..1111111......
1..11111111.....
1.....111111....
1.....1111111...
1.....11111111..
1.....111111111.
1.....1111111111
"""


def grid(text: str) -> np.ndarray:
    return np.array([[c == "1" for c in line] for line in text.split()], dtype=bool)


def test_replay_layout_and_sliding_causal_mask_by_hand():
    rep = replay(PROMPT, SPANS, QUERY)
    assert rep.ids == [P, B1, S, C1, C2, S, A1, A2, S, B1, S, C1, C2, S, Q1, Q2]
    assert rep.blocks == [-1, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5]
    assert (rep.copies, rep.copy_span) == (2, (1, 6))
    np.testing.assert_array_equal(sliding_causal_mask(rep), grid(MASK))
    # the query may see the copies too; a demonstration's row never changes
    everything = sliding_causal_mask(rep, "all")
    np.testing.assert_array_equal(everything[14:], np.tri(16, dtype=bool)[14:])
    np.testing.assert_array_equal(everything[:14], grid(MASK)[:14])


def test_four_shots_each_demonstration_sees_every_demonstration_once_and_never_its_own_copy():
    """The abstract's two aims by hand, K = 4: every demonstration observes the later ones (through their copies),
    and none sees its own copy (no leakage). Demonstration k is token 20+k and a separator S."""
    prompt = [P, 21, S, 22, S, 23, S, 24, S, Q1]
    rep = replay(prompt, [[1, 3], [3, 5], [5, 7], [7, 9]], [9, 10])
    #                 0  1   2  3   4  5   6  7   8  9   10 11  12 13  14 15
    assert rep.ids == [P, 22, S, 23, S, 24, S, 21, S, 22, S, 23, S, 24, S, Q1]
    visible = sliding_causal_mask(rep)
    # each original's label-bearing token: which demonstration tokens (d' or d) it attends to, read off the layout
    expected = {7: [1, 3, 5, 7], 9: [3, 5, 7, 9], 11: [5, 7, 9, 11], 13: [7, 9, 11, 13], 15: [7, 9, 11, 13]}
    demo_tokens = [i for i, t in enumerate(rep.ids) if 21 <= t <= 24]
    for row, keys in expected.items():
        assert [j for j in demo_tokens if visible[row, j]] == keys, row
        assert sorted(rep.ids[j] for j in keys) == [21, 22, 23, 24]  # each demonstration once, itself included
    assert visible[:, 0].all()  # the prefix (BOS) is seen by every token
    assert not visible[15, 1:7].any()  # the query sees no copy


def test_without_repetition_the_mask_is_causal_and_fewer_copies_keep_the_window():
    rep = replay(PROMPT, SPANS, QUERY, repeat=0)
    assert rep.ids == PROMPT and rep.copies == 0
    np.testing.assert_array_equal(sliding_causal_mask(rep), np.tri(len(PROMPT), dtype=bool))
    one = replay(PROMPT, SPANS, QUERY, repeat=1)  # only d3 copied: d1 sees d3', d2 sees d3' and d1, d3 not its copy
    assert one.ids == [P, C1, C2, S, *PROMPT[1:]]
    mask = sliding_causal_mask(one)
    d3 = [i for i, b in enumerate(one.blocks) if b == 3]
    assert not mask[d3[0], 1:4].any() and mask[d3[0], 4:8].all()
    assert replay(PROMPT, SPANS, QUERY, repeat=9).ids == replay(PROMPT, SPANS, QUERY).ids  # at most K-1 copies


def tiny_qwen2(vocab_size: int, layers: int = 1) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_mask_is_what_attention_sees_under_sdpa_and_eager(family):
    """One layer: a row's logits change when a token it sees changes, and not when a token it may not see
    changes; sdpa and eager agree."""
    model = tiny_llama(seed=5, layers=1) if family == "llama" else tiny_qwen2(55)
    rep = replay(PROMPT, SPANS, QUERY)
    visible = sliding_causal_mask(rep)

    def logits(ids, attention):
        model.config._attn_implementation = attention
        mask = additive(visible, torch.float32, "cpu")
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=torch.arange(len(ids))[None])
        return out.logits[0]

    base = logits(rep.ids, "sdpa")
    torch.testing.assert_close(base, logits(rep.ids, "eager"), atol=1e-4, rtol=1e-4)
    for j in range(len(rep.ids)):
        changed = list(rep.ids)
        changed[j] = 20 + (rep.ids[j] + 7) % 30  # another token at j
        moved = (logits(changed, "sdpa") - base).abs().amax(-1) > 1e-5
        np.testing.assert_array_equal(moved.numpy(), visible[:, j], err_msg=f"token {j}")


def icl_items(shots: int = 3, limit: int = 4):
    suite = get_suite("icl")(tokenizer=tiny_tokenizer(), shots=shots, tasks="sentiment,topic")
    return suite, suite.items(limit=limit)


def test_rdsca_without_repetition_equals_ar():
    model = tiny_llama(seed=2)
    suite, items = icl_items()
    for item in items:
        ids = suite.prompt_ids(item)
        plain = Autoregressive().generate(context(ids, model, max_new_tokens=5))
        assert RepeatedDemonstrations(repeat=0).generate(context(ids, model, meta=item.meta, max_new_tokens=5)) == plain


def test_rdsca_decodes_with_the_copies_hidden_as_one_pass_would():
    """The answer's tokens, decoded step by step from the cache, are the argmax of one pass over the whole
    sequence with the mask (the answer in the query's block): cache, mask and positions agree."""
    model = tiny_llama(seed=2)
    suite, items = icl_items(shots=4)
    for item in items:
        ctx = context(suite.prompt_ids(item), model, meta=item.meta, max_new_tokens=5)
        out = RepeatedDemonstrations().generate(ctx)
        rep = replay_for(ctx, -1)
        assert rep.copies == 3 and ctx.extras == {"rdsca_prompt_tokens": len(rep.ids), "rdsca_copies": 3}
        whole = replay(rep.ids[:rep.copy_span[0]] + rep.ids[rep.copy_span[1]:] + out[:-1],
                       item.meta["demo_token_spans"], item.meta["query_token_span"])
        assert whole.ids == rep.ids + out[:-1]
        mask = additive(sliding_causal_mask(whole), torch.float32, "cpu")
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([whole.ids]), attention_mask=mask).logits[0]
        assert logits[len(rep.ids) - 1:].argmax(-1).tolist() == out


def test_rdsca_on_icl_items_with_smollm2_copies_the_later_demonstrations_text():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip("smollm2-135m not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    suite = get_suite("icl")(tokenizer=tok, shots=4)
    for item in suite.items(limit=3):
        rep = replay_for(context(suite.prompt_ids(item), None, meta=item.meta), -1)
        demos, sep = item.meta["demonstrations"], item.meta["separator"]
        assert tok.decode(rep.ids) == "".join(d + sep for d in demos[1:]) + item.turns[0]


def test_label_loglikelihoods_without_repetition_are_plain_causal_ones():
    model = tiny_llama(seed=2)
    suite, items = icl_items()
    item = items[0]
    ids = suite.prompt_ids(item)
    choices = [[20, 21], [22]]
    got = label_loglikelihoods(model, replay(ids, item.meta["demo_token_spans"], item.meta["query_token_span"], 0),
                               choices)
    for value, tokens in zip(got, choices):
        with torch.inference_mode():
            rows = model(input_ids=torch.tensor([ids + tokens])).logits[0].log_softmax(-1)
        expected = sum(float(rows[len(ids) - 1 + k, t]) for k, t in enumerate(tokens))
        assert value == pytest.approx(expected, abs=1e-4)
    rep = replay(ids, item.meta["demo_token_spans"], item.meta["query_token_span"])
    kv = ReplayKV(model, rep, "demonstrations")
    first = kv.prefill().log_softmax(-1)
    assert label_loglikelihoods(model, rep, [[22]])[0] == pytest.approx(float(first[22]), abs=1e-5)


def test_rdsca_refuses_an_item_without_demonstrations():
    model = tiny_llama(seed=2)
    with pytest.raises(ValueError, match="demo_token_spans"):
        RepeatedDemonstrations().generate(context([5, 6, 7], model, meta={"task": "writing"}))
