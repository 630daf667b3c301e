"""The harness owns stateful methods' state: one snapshot per (item, turn) for every repeat and budget
point, carried (or not) across items, never primed by the warm-up, exact across a resume."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.instrument import Budget
from harness.results import read_records
from harness.runner import RunConfig, Runner
from methods import base as method_base
from methods.base import Method
from methods.common.speculation import ChainVerifier
from tests.test_runner import QUESTIONS, data_file  # noqa: F401 - the fixture

ORDER = [("chat-1", 0), ("chat-1", 1), ("qa-1", 0), ("qa-2", 0), ("x-1", 0)]


@pytest.fixture
def recall_method():
    """A test-only stateful drafter: it drafts what followed the pending token in every prompt and
    output it has seen before (its ctx.state), so what it accepts depends on what the state holds."""

    @method_base.register("recall_test_method")
    class Recall(Method):
        stateful = True

        def generate(self, ctx):
            history = ctx.state.setdefault("history", [])
            ctx.extras["history_len"] = len(history)  # what this attempt started from
            ctx.extras["corpus_texts"] = len(ctx.corpus)
            history.extend(ctx.prompt_ids)
            verifier = ChainVerifier(ctx)
            while not ctx.done:  # (a budget may stop it mid-way: the state keeps what it has seen so far)
                k, drafts, start = verifier.room(4), [], len(history)
                if k and verifier.pending in history[:start - 1]:
                    at = start - 2 - history[start - 2::-1].index(verifier.pending)
                    drafts = history[at + 1: at + 1 + k]
                before = len(ctx.output)
                verifier.step(drafts)
                history.extend(ctx.output[before:])
            return ctx.output

    yield Recall
    method_base._REGISTRY.pop("recall_test_method")


def config(model_dirs, data_file, out, **kw):  # noqa: F811
    defaults = dict(methods=["ar", "recall_test_method"], target=model_dirs[0], draft=None, data=data_file,
                    max_new_tokens=12, out=str(out), warmup=False, strict_counting=True, trackers=False)
    return RunConfig(**{**defaults, **kw})


def run(cfg) -> list[dict]:
    Runner(cfg).run()
    return read_records(Path(cfg.out) / "results.jsonl")


def mine(records, **match) -> dict:
    found = [r for r in records if r["method"] == "recall_test_method" and all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, match
    return found[0]


def test_repeats_and_budget_points_start_from_one_snapshot(model_dirs, data_file, tmp_path, cache_dir,  # noqa: F811
                                                           recall_method):
    points = [Budget(max_target_calls=3), Budget(max_target_calls=8)]
    records = run(config(model_dirs, data_file, tmp_path / "run", repeats=2, budgets=points, warmup=True,
                         max_new_tokens=24))
    assert not [r["error"] for r in records if r["error"]]
    for item_id, turn in ORDER:
        for point in points:
            first, second = (mine(records, item_id=item_id, turn=turn, repeat=k, budget=point.label) for k in (0, 1))
            assert first["output_ids"] == second["output_ids"]
            assert first["accept_lengths"] == second["accept_lengths"]
            assert first["extras"]["history_len"] == second["extras"]["history_len"]
        # both budget points of one (item, turn) start from the same state
        assert len({mine(records, item_id=item_id, turn=turn, repeat=0, budget=p.label)["extras"]["history_len"]
                    for p in points}) == 1
    # the warm-up (item 0, turn 0) did not prime the state: the first record starts empty
    assert mine(records, item_id="chat-1", turn=0, repeat=1, budget=points[1].label)["extras"]["history_len"] == 0
    # the state carried on is the one the canonical attempt left (repeat 0, first budget point)
    carried = 0
    for item_id, turn in ORDER:
        canonical = mine(records, item_id=item_id, turn=turn, repeat=0, budget=points[0].label)
        assert canonical["extras"]["history_len"] == carried
        carried += canonical["prompt_tokens"] + canonical["new_tokens"]
    seen = [mine(records, item_id=i, turn=t, repeat=0, budget=points[0].label)["state_items_seen"] for i, t in ORDER]
    assert seen == [0, 0, 1, 2, 3]  # earlier distinct items; a later turn does not count its own item
    for r in records:
        assert r["method_state"] == "carry" and r["state_note"] is None
        if r["method"] == "ar":
            assert r["state_items_seen"] is None
        else:
            assert r["lossless_check"]["equal"]  # greedy: drafts from the state never change the output
            assert r["extras"]["corpus_texts"] == sum(len(q["turns"]) for q in QUESTIONS)
    assert (tmp_path / "run" / "state" / "recall_test_method.after.pt").is_file()


def test_fresh_state_empties_before_every_item(model_dirs, data_file, tmp_path, cache_dir, recall_method):  # noqa: F811
    records = run(config(model_dirs, data_file, tmp_path / "fresh", method_state="fresh"))
    first_turn = mine(records, item_id="chat-1", turn=0)
    assert mine(records, item_id="chat-1", turn=1)["extras"]["history_len"] == (
        first_turn["prompt_tokens"] + first_turn["new_tokens"])  # the turns of one item follow each other
    for item_id, turn in ORDER:
        r = mine(records, item_id=item_id, turn=turn)
        assert r["state_items_seen"] == 0 and r["method_state"] == "fresh"
        if turn == 0:
            assert r["extras"]["history_len"] == 0


def test_corpus_is_the_turns_without_references(model_dirs, data_file, tmp_path, cache_dir):  # noqa: F811
    runner = Runner(config(model_dirs, data_file, tmp_path / "corpus", methods=["ar"]))
    assert runner.corpus == [text for q in QUESTIONS for text in q["turns"]]


FIGURES = ("output_ids", "accept_lengths", "extras", "state_items_seen", "state_note")


def interrupted_then_resumed(cfg, monkeypatch, after: int, between=None) -> list[dict]:
    real_record = Runner._record
    calls = {"n": 0}

    def interrupt(self, *args):
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise KeyboardInterrupt
        return real_record(self, *args)

    monkeypatch.setattr(Runner, "_record", interrupt)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg).run()
    monkeypatch.setattr(Runner, "_record", real_record)
    if between:
        between()
    return run(cfg)


@pytest.mark.parametrize("after", [1, 2, 3, 5])  # mid-(item, turn) after its canonical attempt, and between items
def test_resume_restores_the_state_exactly(model_dirs, data_file, tmp_path, cache_dir, recall_method,  # noqa: F811
                                           monkeypatch, after):
    whole = run(config(model_dirs, data_file, tmp_path / "whole", methods=["recall_test_method"], repeats=2))
    resumed = interrupted_then_resumed(config(model_dirs, data_file, tmp_path / "resumed",
                                              methods=["recall_test_method"], repeats=2), monkeypatch, after)
    key = lambda r: (r["item_id"], r["turn"], r["repeat"])  # noqa: E731
    assert len(resumed) == len(whole) == 2 * len(ORDER)
    expected = {key(r): [r[f] for f in FIGURES] for r in whole}
    assert {key(r): [r[f] for f in FIGURES] for r in resumed} == expected


def test_resume_without_the_saved_state_says_so(model_dirs, data_file, tmp_path, cache_dir, recall_method,  # noqa: F811
                                                monkeypatch):
    out = tmp_path / "lost"
    records = interrupted_then_resumed(config(model_dirs, data_file, out, methods=["recall_test_method"]), monkeypatch,
                                       after=3, between=lambda: shutil.rmtree(out / "state"))
    early = [mine(records, item_id=i, turn=t) for i, t in ORDER[:3]]
    late = [mine(records, item_id=i, turn=t) for i, t in ORDER[3:]]
    assert all(r["state_note"] is None for r in early)
    assert all("not found" in r["state_note"] and "empty state" in r["state_note"] for r in late)
    assert late[0]["extras"]["history_len"] == 0 and late[0]["state_items_seen"] == 0
    assert late[1]["state_items_seen"] == 1  # truthful: the state has seen one item since it restarted
