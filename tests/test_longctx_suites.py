"""The generated long-context suites (longctx, longppl) and the in-context classification suite (icl)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_tokenizer

from methods.base import SettingError
from suites.base import Item, get_suite, items_sha256
from suites.chronicle import GIVEN
from suites.longctx import TASKS, parse_lengths, string_match_all, string_match_part

SMOLLM2 = Path(os.path.expanduser("~/.cache/decodebench/smollm2-135m"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smol():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip("smollm2-135m not installed: decodebench models install smollm2-135m")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM2))


def longctx(tokenizer, **options):
    return get_suite("longctx")(tokenizer=tokenizer, **options)


# ---------------------------------------------------------------- the contract


def test_an_item_without_meta_hashes_as_before_meta_existed():
    items = get_suite("specbench")().items(limit=2)
    legacy = hashlib.sha256()
    for item in items:
        row = (item.item_id, item.category, item.turns, item.reference, item.subcategory)
        legacy.update(json.dumps(row, ensure_ascii=False).encode())
    assert items_sha256(items) == legacy.hexdigest()
    with_meta = [dataclasses.replace(items[0], meta={"task": "x"})]
    assert items_sha256(with_meta) != items_sha256(items[:1])
    assert hash(with_meta[0]) == hash(items[0])  # meta stays out of hash(item)


def test_specbench_keeps_its_contract_and_refuses_options():
    suite = get_suite("specbench")()
    item = suite.items(limit=1)[0]
    assert suite.prompt_ids(item) is None and suite.score(item, "x") == (None, None)
    with pytest.raises(SettingError, match="suite specbench has no option lengths"):
        get_suite("specbench")(lengths="1k")


def test_longctx_needs_a_tokenizer():
    with pytest.raises(SettingError, match="pass the target's tokenizer"):
        get_suite("longctx")()


# ---------------------------------------------------------------- options


def test_lengths_take_k_suffixes():
    assert parse_lengths("1k, 2k,4096,0.5k") == (1024, 2048, 4096, 512)


@pytest.mark.parametrize(("options", "message"), [
    ({"lengths": "0"}, r"longctx\.lengths must be in \[64, "),
    ({"lengths": "1q"}, r"longctx\.lengths must be token counts"),
    ({"depths": "0,150"}, r"longctx\.depths must be in \[0, 100\]"),
    ({"tasks": "niah_single,needle"}, r"longctx\.tasks: unknown task needle"),
    ({"samples": "0"}, r"longctx\.samples must be in \[1, "),
    ({"haystack": "essay"}, r"longctx\.haystack must be one of auto, noise, needles, text"),
    ({"haystack": "text"}, r"longctx\.haystack=text reads its text from --data"),
    ({"colour": "red"}, r"suite longctx has no option colour"),
])
def test_bad_options_are_errors_naming_the_option(tiny, options, message):
    with pytest.raises(SettingError, match=message):
        longctx(tiny, **options)


def test_a_length_too_short_for_the_task_says_so(tiny):
    with pytest.raises(SettingError, match=r"longctx\.lengths: 100 tokens is too short for cwe"):
        longctx(tiny, tasks="cwe", lengths="100").items()


def test_grid_is_tasks_by_lengths_by_depths_by_samples(tiny):
    items = longctx(tiny, lengths="1k,2k", depths="0,50,100", samples=2, tasks="niah_single,vt").items()
    assert sum(i.category == "niah_single" for i in items) == 2 * 3 * 2
    assert sum(i.category == "vt" for i in items) == 2 * 2  # depth only matters for niah
    assert len({i.item_id for i in items}) == len(items)
    assert {i.meta["depth"] for i in items if i.category == "vt"} == {None}
    assert len(longctx(tiny, lengths="1k,2k", samples=2).items(limit=3)) == 3 * len(TASKS)


# ---------------------------------------------------------------- determinism


def test_same_seed_same_items_other_seed_other_items(tiny):
    options = {"lengths": "512,1k", "depths": "0,50", "samples": 1}
    first, again = longctx(tiny, **options).items(), longctx(tiny, **options).items()
    assert items_sha256(first) == items_sha256(again) and first == again
    other = longctx(tiny, seed=1, **options).items()
    assert all(a.turns != b.turns for a, b in zip(first, other))


def test_a_subset_of_tasks_gives_the_same_items(tiny):
    every = {i.item_id: i for i in longctx(tiny, lengths="1k", depths="50").items()}
    assert longctx(tiny, lengths="1k", depths="50", tasks="fwe").items()[0] == every["fwe-1024-s0"]


_GENERATE = """
import sys; sys.path.insert(0, 'tests')
from conftest import tiny_tokenizer
from suites.base import get_suite, items_sha256
tok = tiny_tokenizer()
print(items_sha256(get_suite('longctx')(tokenizer=tok, lengths='512', depths='50').items()))
print(items_sha256(get_suite('longppl')(length=2000).items()))
print(items_sha256(get_suite('icl')(tokenizer=tok).items()))
"""


def test_items_do_not_depend_on_the_process_hash_seed(tiny):
    """Set iteration order changes with the hash seed: nothing generated may depend on it."""
    here = [items_sha256(get_suite("longctx")(tokenizer=tiny, lengths="512", depths="50").items()),
            items_sha256(get_suite("longppl")(length=2000).items()),
            items_sha256(get_suite("icl")(tokenizer=tiny).items())]
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _GENERATE], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == here


# ---------------------------------------------------------------- lengths and depths


def _check_lengths(suite, items, slack):
    for item in items:
        ids = suite.prompt_ids(item)
        assert len(ids) == item.meta["tokens"], item.item_id
        assert item.meta["length"] - slack <= len(ids) <= item.meta["length"], (item.item_id, len(ids))


def test_prompts_have_the_requested_length_under_the_tiny_tokenizer(tiny):
    suite = longctx(tiny, lengths="700,1k,3000", depths="10,90")
    _check_lengths(suite, suite.items(), slack=0)  # one word, one token: exact


@pytest.mark.parametrize("haystack", ["noise", "needles"])
def test_prompts_have_the_requested_length_under_smollm2(smol, haystack):
    suite = longctx(smol, lengths="1000,2k,3000", depths="0,50,100", haystack=haystack, keys="uuids")
    items = suite.items()
    _check_lengths(suite, [i for i in items if i.category in ("niah_single", "niah_multikey", "vt")], slack=3)
    # cwe stops at a list entry (' 1234. zokev': up to ~10 tokens), fwe at a coded word
    _check_lengths(suite, [i for i in items if i.category in ("cwe", "fwe")], slack=10)


def test_a_prompt_is_the_chat_template_around_the_turn_then_the_answer_prefix(smol):
    suite = longctx(smol, lengths="1k", depths="50", tasks="niah_single")
    item = suite.items()[0]
    text = smol.decode(suite.prompt_ids(item))
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n" + item.meta["answer_prefix"])
    plain = longctx(smol, lengths="1k", depths="50", tasks="niah_single", chat=False)
    assert smol.decode(plain.prompt_ids(plain.items()[0])).startswith("A hidden number is tucked")


@pytest.mark.parametrize("depth", [0, 25, 50, 75, 100])
def test_the_needle_sits_at_the_requested_depth(smol, depth):
    suite = longctx(smol, lengths="2k", depths=str(depth), tasks="niah_single")
    item = suite.items()[0]
    user, answer = item.turns[0], item.reference[0]
    start, end = item.meta["context_span"]
    context = user[start:end]
    found = re.search(rf"Note: the hidden number filed under \S+ is {answer}\.", context)
    needle, at = found.group(0), found.start()

    def count(text):
        return len(smol(text, add_special_tokens=False)["input_ids"])

    # tokens of the context before the needle, over the context's tokens without the needle
    measured = 100 * count(context[:at]) / (count(context) - count(needle))
    assert abs(measured - depth) <= 1.5, measured
    assert abs(item.meta["depth_actual"] - depth) <= 1.5
    ids = suite.prompt_ids(item)
    assert answer in smol.decode(ids[item.meta["needle_tokens"][0]:item.meta["needle_tokens"][0] + 40])


def test_the_answer_is_in_a_single_needle_prompt_exactly_once(smol, tiny):
    for tokenizer in (tiny, smol):
        for values in ("numbers", "words", "uuids"):
            suite = longctx(tokenizer, lengths="1k", depths="0,50,100", tasks="niah_single", haystack="needles",
                            values=values)
            for item in suite.items():
                (answer,) = item.reference
                assert suite.prompt_text(item).count(answer) == 1, item.item_id


def test_multi_tasks_ask_for_every_value_and_hide_distractors(tiny):
    items = {i.category: i for i in longctx(tiny, lengths="1k", depths="50", needles=3).items()}
    assert len(items["niah_multivalue"].reference) == 3 and len(items["niah_multiquery"].reference) == 3
    multikey = items["niah_multikey"]
    assert len(multikey.reference) == 1 and multikey.turns[0].count("Note: the hidden number filed under") == 3
    vt = items["vt"]
    assert len(vt.reference) == 5 and all(f"VAR {name} =" in vt.turns[0] for name in vt.reference)


def test_frequent_and_common_words_are_what_the_text_holds(tiny):
    items = {i.category: i for i in longctx(tiny, lengths="2k,5k", tasks="cwe,fwe").items(limit=2)}
    for item in items.values():
        start, end = item.meta["context_span"]
        words = item.turns[0][start:end].split()
        if item.category == "fwe":
            counts = sorted(((words.count(w), w) for w in set(words) - {"..."}), reverse=True)
            assert [w for _, w in counts[:3]] == list(item.reference) and counts[2][0] > counts[3][0]
        else:
            listed = words[1::2]  # '1.', 'word', '2.', 'word', ...
            least_common = min(listed.count(w) for w in item.reference)
            most_rare = max(listed.count(w) for w in set(listed) - set(item.reference))
            assert least_common > most_rare


def test_data_file_makes_the_haystack(tiny, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("The robot paints the house. The cat reads to the dog! A river was blue and green? " * 5)
    suite = longctx(tiny, data=str(text), lengths="512", depths="50", tasks="niah_single")
    item = suite.items()[0]
    start, end = item.meta["context_span"]
    needle = re.search(rf"Note: [^.]* is {item.reference[0]}\.", item.turns[0]).group(0)
    haystack = item.turns[0][start:end].replace(needle, " ")
    assert set(haystack.split()) <= set(text.read_text().split())
    assert item.meta["haystack"] == "text" and item.meta["tokens"] == 512
    with pytest.raises(SettingError, match="--data gives the haystack text, but haystack=noise"):
        longctx(tiny, data=str(text), haystack="noise")


# ---------------------------------------------------------------- scoring


def test_ruler_string_match_by_hand():
    assert string_match_all("The numbers are 123 and 456.", ["123", "789"]) == 0.5
    assert string_match_all("COPPER-Lantern", ["copper-lantern"]) == 1.0
    assert string_match_all("nothing here", ["a1", "b2", "c3", "d4"]) == 0.0
    assert string_match_part("The numbers are 123 and 456.", ["123", "789"]) == 1.0
    assert string_match_part("none", ["123", "789"]) == 0.0


def test_longctx_scores_its_items(tiny):
    item = longctx(tiny, lengths="1k", depths="50", tasks="niah_multivalue", needles=4).items()[0]
    suite = longctx(tiny, lengths="1k")
    a, b, *_ = item.reference
    assert suite.score(item, f"They are {a} and {b}.") == (0.5, "string_match_all")
    assert suite.score(item, " ".join(item.reference).upper()) == (1.0, "string_match_all")


# ---------------------------------------------------------------- longppl


def test_generated_document_is_long_enough_and_seeded(smol):
    suite = get_suite("longppl")(tokenizer=smol, length=4000)
    (doc,) = suite.items()
    tokens = len(smol(doc.turns[0], add_special_tokens=False)["input_ids"])
    assert doc.meta["tokens"] == tokens and 4000 <= tokens < 4400  # cut at the first paragraph end past 4000
    assert doc.reference is None and doc.category == "document" and doc.item_id == "chronicle-0"
    assert get_suite("longppl")(tokenizer=smol, length=4000).items() == [doc]
    assert get_suite("longppl")(tokenizer=smol, length=4000, seed=1).items()[0].turns != doc.turns
    given = "|".join(name for names in GIVEN.values() for name in names)
    early = set(re.findall(rf"\b(?:{given}) [A-Z][a-z]+", doc.turns[0][:3000]))
    late = doc.turns[0][len(doc.turns[0]) // 2:]
    assert any(name in late for name in early)  # the cast recurs far into the text


def test_data_text_is_cut_into_consecutive_documents(tiny, tmp_path):
    path = tmp_path / "play.txt"
    lines = [" ".join(["the robot paints the house"] * 3) for _ in range(200)]
    path.write_text("\n".join(lines) + "\n")
    docs = get_suite("longppl")(data=str(path), tokenizer=tiny, length=1000, documents=5).items()
    # 200 lines of 15 tokens: the 1000th token ends line 67, so 1005 tokens a piece, then the 990 left
    assert [d.meta["tokens"] for d in docs] == [1005, 1005, 990]
    assert "".join(d.turns[0] for d in docs) == path.read_text()
    assert [d.item_id for d in docs] == ["play-0", "play-1", "play-2"]


# ---------------------------------------------------------------- icl


def test_icl_items_carry_their_demonstrations_and_spans(smol):
    suite = get_suite("icl")(tokenizer=smol, shots=4)
    items = suite.items()
    assert len(items) == 172 and {i.category for i in items} == {"sentiment", "topic", "fact_opinion"}
    item = items[0]
    ids, prompt = suite.prompt_ids(item), item.turns[0]
    for demo, (a, b), (s, e) in zip(item.meta["demonstrations"], item.meta["demo_spans"], item.meta["demo_token_spans"]):
        assert prompt[a:b] == demo and smol.decode(ids[s:e]) == demo
    s, e = item.meta["query_token_span"]
    a, b = item.meta["query_span"]
    assert smol.decode(ids[s:e]) == prompt[a:b] and b == len(prompt) and e == len(ids)
    query_text = prompt[item.meta["query_span"][0]:].split("\n")[0]
    assert all(query_text not in demo for demo in item.meta["demonstrations"])  # never its own demonstration
    assert prompt.endswith(("\nSentiment:", "\nTopic:", "\nType:"))


def test_icl_is_seeded_and_mixes_labels_under_a_limit(tiny):
    first = get_suite("icl")(tokenizer=tiny).items(limit=8)
    assert first == get_suite("icl")(tokenizer=tiny).items(limit=8)
    assert first != get_suite("icl")(tokenizer=tiny, seed=3).items(limit=8)
    assert {i.reference[0] for i in first if i.category == "sentiment"} == {"positive", "negative"}
    with pytest.raises(SettingError, match=r"icl\.shots must be in \[0, 32\]"):
        get_suite("icl")(tokenizer=tiny, shots=40)


def test_icl_scoring_by_hand(tiny):
    suite = get_suite("icl")(tokenizer=tiny)
    item = next(i for i in suite.items() if i.reference == ("negative",))
    assert suite.choices(item) == [" positive", " negative"]
    assert suite.score_choices(item, [-3.0, -1.5]) == (1.0, "label_loglikelihood")
    assert suite.score_choices(item, [-1.0, -1.5]) == (0.0, "label_loglikelihood")
    assert suite.score(item, " Negative.\n\nReview: ...") == (1.0, "first_word_match")
    assert suite.score(item, " positive") == (0.0, "first_word_match")
    assert suite.score(item, "") == (0.0, "first_word_match")


def test_items_are_items(tiny):
    assert all(isinstance(i, Item) for i in longctx(tiny, lengths="512", depths="50").items())
