from __future__ import annotations

import json

import pytest

from suites.base import SuiteDataError, get_suite
from suites.specbench import CATEGORIES, load_questions


def test_builtin_set_has_eight_items_per_category():
    items = get_suite("specbench")().items()
    for category in CATEGORIES:
        assert sum(i.category == category for i in items) >= 8
    assert all(len(i.turns) == 2 for i in items if i.category == "mt_bench")
    assert all(i.reference for i in items if i.category != "mt_bench")


def test_limit_keeps_first_n_per_category():
    items = get_suite("specbench")().items(limit=2)
    assert len(items) == 2 * len(CATEGORIES)
    assert [i.item_id for i in items[:2]] == ["mt_bench-01", "mt_bench-02"]


def test_malformed_line_names_its_number(tmp_path):
    path = tmp_path / "q.jsonl"
    good = json.dumps({"question_id": 1, "category": "qa", "turns": ["hi"]})
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(SuiteDataError, match=r"q.jsonl:3: not valid JSON"):
        load_questions(path)
    path.write_text(good + "\n" + json.dumps({"question_id": 2, "turns": ["x"]}) + "\n")
    with pytest.raises(SuiteDataError, match=r":2: missing field\(s\) category"):
        load_questions(path)
    path.write_text(good + "\n" + json.dumps({"question_id": 3, "category": "qa", "turns": []}) + "\n")
    with pytest.raises(SuiteDataError, match=":2: 'turns' must be"):
        load_questions(path)
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(SuiteDataError, match="duplicate question_id"):
        load_questions(path)


def test_unknown_categories_are_kept_and_references_normalised(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"question_id": "a", "category": "poetry", "turns": ["x"], "reference": "y"},
            {"question_id": "b", "category": "qa", "turns": ["z"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = get_suite("specbench")(data=str(path)).items()
    assert [i.category for i in items] == ["qa", "poetry"]
    assert items[1].reference == ("y",)


def test_second_turn_sees_the_models_own_first_answer():
    item = get_suite("specbench")().items(limit=1)[0]
    chat = item.messages(1, ["my answer"])
    assert [m["role"] for m in chat] == ["user", "assistant", "user"] and chat[1]["content"] == "my answer"
