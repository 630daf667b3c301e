"""The Spec-Bench table against a hand computation of evaluation/speed.py's definition, and the loader's
grouping of MT-bench's eight categories, on small hand-written data."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.tables import CATEGORY_ORDER, speed_table
from suites.specbench import MT_BENCH_SUBCATEGORIES, load_questions

# (method, repeat, item, category, turn) -> (new tokens, wall seconds, accepted length per step)
SPS_STEPS = {("81", 0): [8] * 5, ("81", 1): [1] * 20, ("82", 0): [10] * 3, ("82", 1): [3] * 10,
             ("q1", 0): [5] * 10, ("q2", 0): [2] * 10}
RUNS = {
    ("ar", 0): {("81", 0): (40, 4), ("81", 1): (20, 1), ("82", 0): (30, 3), ("82", 1): (30, 3),
                ("q1", 0): (50, 5), ("q2", 0): (20, 1)},
    ("ar", 1): {("81", 0): (40, 4), ("81", 1): (20, 3), ("82", 0): (30, 3), ("82", 1): (30, 3),
                ("q1", 0): (50, 5), ("q2", 0): (20, 1)},
    ("sps", 0): {("81", 0): (40, 2), ("81", 1): (20, 2), ("82", 0): (30, 1), ("82", 1): (30, 2),
                 ("q1", 0): (50, 2), ("q2", 0): (20, 2)},
    ("sps", 1): {("81", 0): (40, 4), ("81", 1): (20, 1), ("82", 0): (30, 1), ("82", 1): (30, 2),
                 ("q1", 0): (50, 5), ("q2", 0): (20, 1)},
}
CATEGORY = {"81": ("mt_bench", "writing"), "82": ("mt_bench", "math"), "q1": ("qa", None), "q2": ("qa", None)}
TURNS = {"81": 2, "82": 2, "q1": 1, "q2": 1}


def _records(changes: dict | None = None) -> pd.DataFrame:
    changes = changes or {}
    rows = []
    for (method, repeat), turns in RUNS.items():
        for (item, turn), (tokens, wall) in turns.items():
            steps = SPS_STEPS[item, turn] if method == "sps" else [1] * tokens
            category, subcategory = CATEGORY[item]
            rows.append({"method": method, "suite": "specbench", "category": category, "subcategory": subcategory,
                         "item_id": item, "item_turns": TURNS[item], "turn": turn, "repeat": repeat, "budget": "",
                         "new_tokens": tokens, "wall_s": float(wall), "tokens_per_s": tokens / wall,
                         "accept_lengths": steps, "target_calls": len(steps), "error": None,
                         **changes.get((method, repeat, item, turn), {})})
    return pd.DataFrame(rows)


# Hand computation. Question speed = tokens summed over turns / seconds summed over turns:
#   repeat 0: ar  81: 60/5 = 12, 82: 60/6 = 10, q1: 50/5 = 10, q2: 20/1 = 20
#             sps 81: 60/4 = 15, 82: 60/3 = 20, q1: 50/2 = 25, q2: 20/2 = 10
#   repeat 1: ar  81: 60/7,      82: 10,        q1: 10,        q2: 20
#             sps 81: 60/5 = 12, 82: 20,        q1: 10,        q2: 20
# Per repeat: mean over questions, method over baseline; then the mean over repeats (speed.py's mean report).
MT_BENCH = ((15 + 20) / 2 / ((12 + 10) / 2) + (12 + 20) / 2 / ((60 / 7 + 10) / 2)) / 2
QA = ((25 + 10) / 2 / ((10 + 20) / 2) + (10 + 20) / 2 / ((10 + 20) / 2)) / 2
OVERALL = ((15 + 20 + 25 + 10) / 4 / ((12 + 10 + 10 + 20) / 4)
           + (12 + 20 + 10 + 20) / 4 / ((60 / 7 + 10 + 10 + 20) / 4)) / 2
SPS_TOKENS_PER_S = ((15 + 20 + 25 + 10) / 4 + (12 + 20 + 10 + 20) / 4) / 2
# #MAT pooled over every step of every record: 190 tokens in 5 + 20 + 3 + 10 + 10 + 10 = 58 steps per repeat
# (the mean of the records' own means would be (8 + 1 + 10 + 3 + 5 + 2) / 6 = 4.83)
SPS_MAT = 2 * 190 / (2 * 58)
assert SPS_MAT == sum(sum(steps) for steps in SPS_STEPS.values()) / sum(map(len, SPS_STEPS.values()))  # flattened


def test_table_matches_speed_py_definition_by_hand():
    table = speed_table(_records())
    assert list(table.columns[:2]) == ["mt_bench", "qa"]
    assert table.loc["sps", "mt_bench"] == pytest.approx(MT_BENCH)
    assert table.loc["sps", "qa"] == pytest.approx(QA)
    assert table.loc["sps", "Overall speed-up"] == pytest.approx(OVERALL)
    assert table.loc["sps", "Tokens/s"] == pytest.approx(SPS_TOKENS_PER_S)
    assert table.loc["sps", "#MAT"] == pytest.approx(SPS_MAT)
    assert table.loc["ar", "#MAT"] == pytest.approx(1.0)
    assert table.loc["ar", ["mt_bench", "qa", "Overall speed-up"]].tolist() == pytest.approx([1.0] * 3)
    low, high = table.loc["sps", ["Overall CI low", "Overall CI high"]]
    assert low < OVERALL < high  # resampled over the four questions


def test_a_question_counts_only_when_every_turn_succeeded():
    # sps fails turn 1 of question 82 in repeat 1: that repeat compares questions 81, q1 and q2 only
    table = speed_table(_records({("sps", 1, "82", 1): {"error": "boom", "wall_s": 1000.0}}))
    repeat1_mt = 12 / (60 / 7)
    repeat1_all = (12 + 10 + 20) / 3 / ((60 / 7 + 10 + 20) / 3)
    assert table.loc["sps", "mt_bench"] == pytest.approx(((15 + 20) / 2 / ((12 + 10) / 2) + repeat1_mt) / 2)
    assert table.loc["sps", "Overall speed-up"] == pytest.approx(
        ((15 + 20 + 25 + 10) / 4 / ((12 + 10 + 10 + 20) / 4) + repeat1_all) / 2)


# Spec-Bench's question.jsonl format: integer ids, MT-bench's eight categories on the MT-bench questions,
# the other five categories by name; a reference on some. The text is written for this test.
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Draft a postcard from a lighthouse keeper.",
                                                         "Make it rhyme."]},
    {"question_id": 82, "category": "roleplay", "turns": ["You are a ferry captain; greet the passengers.",
                                                          "Announce a delay politely."]},
    {"question_id": 83, "category": "reasoning", "turns": ["If every lamp is blue and this is a lamp, what colour is it?",
                                                           "What if only some lamps are blue?"]},
    {"question_id": 84, "category": "math", "turns": ["What is 17 times 3?", "And divided by 3 again?"],
     "reference": ["51", "17"]},
    {"question_id": 85, "category": "coding", "turns": ["Write a shell loop printing 1 to 3.", "Now count down."]},
    {"question_id": 86, "category": "extraction", "turns": ["List the cities in: 'We flew from Oslo to Lima.'",
                                                            "Return them as JSON."]},
    {"question_id": 87, "category": "stem", "turns": ["Why does ice float on water?", "Explain it to a child."]},
    {"question_id": 88, "category": "humanities", "turns": ["Name one cause of the printing press's spread.",
                                                            "Give a second one."]},
    {"question_id": 161, "category": "translation", "turns": ["Translate to French: the garden is quiet."],
     "reference": ["Le jardin est calme."]},
    {"question_id": 241, "category": "summarization", "turns": ["Summarise: the train left late, then arrived early."],
     "reference": ["The late train arrived early."]},
    {"question_id": 321, "category": "qa", "turns": ["Which planet is called the red planet?"], "reference": ["Mars"]},
    {"question_id": 401, "category": "math_reasoning", "turns": ["Tom has 4 pens and buys 5 more. How many?"],
     "reference": ["9"]},
    {"question_id": 481, "category": "rag", "turns": ["Context: the bridge opened in 1932. When did it open?"],
     "reference": ["1932"]},
]


def test_loader_groups_mt_bench_categories_into_six_columns(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    items = load_questions(path)
    assert {item.subcategory for item in items if item.category == "mt_bench"} == set(MT_BENCH_SUBCATEGORIES)
    assert all(item.subcategory is None for item in items if item.category != "mt_bench")
    assert sorted({item.category for item in items}) == sorted(CATEGORY_ORDER)
    rows = [{"method": method, "suite": "specbench", "category": item.category, "subcategory": item.subcategory,
             "item_id": item.item_id, "item_turns": len(item.turns), "turn": turn, "new_tokens": 10,
             "wall_s": 1.0 if method == "ar" else 0.5, "target_calls": 10, "error": None}
            for method in ("ar", "sps") for item in items for turn in range(len(item.turns))]
    table = speed_table(pd.DataFrame(rows))
    assert list(table.columns[:6]) == CATEGORY_ORDER  # Spec-Bench's six columns, in its order
    assert table.loc["sps", CATEGORY_ORDER].tolist() == pytest.approx([2.0] * 6)
