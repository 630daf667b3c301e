"""Token Recycling's matrix and trees, ADED's search, and the n-gram stores, on hand-made examples."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from methods.aded import TrigramMatrix, mcts_drafts
from methods.base import DecodeContext, Sampling, SettingError, get_method
from methods.common.ngram import NGramTable, SuffixIndex, corpus_sequences
from methods.common.tree import ROOT
from methods.token_recycling import TEMPLATE_2_2_2, build_tree, recycle
from tests.conftest import tiny_tokenizer


def test_template_is_the_releases_80_nodes_over_6_levels():
    levels = [sum(1 for p in TEMPLATE_2_2_2 if len(p) == d) for d in range(1, 7)]
    assert levels == [8, 21, 25, 15, 8, 3] and len(set(TEMPLATE_2_2_2)) == 80
    assert all(p[:-1] in set(TEMPLATE_2_2_2) | {()} for p in TEMPLATE_2_2_2)  # every parent is in it


def test_tree_is_a_breadth_first_walk_of_the_matrix():
    matrix = torch.zeros(10, 2, dtype=torch.int32)
    matrix[1] = torch.tensor([2, 3])
    matrix[2] = torch.tensor([4, 5])
    matrix[3] = torch.tensor([6, 6])
    template = [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0)]
    tree = build_tree(matrix, 1, template, max_depth=3)
    # root 1 -> 2, 3; 2 -> 4, 5; 3 -> 6 (twice: merged); 4 -> row 4 is empty (zeros) -> 0
    assert tree.tokens == [2, 3, 4, 5, 6, 0]
    assert tree.parents == [ROOT, ROOT, 0, 0, 1, 2]
    assert build_tree(matrix, 1, template, max_depth=1).tokens == [2, 3]
    assert len(build_tree(matrix, 1, template, max_depth=0)) == 0


def test_recycling_overwrites_the_rows_of_the_fed_tokens_with_the_top_k():
    matrix = torch.zeros(6, 2, dtype=torch.int32)
    matrix[5] = torch.tensor([1, 1])
    logits = torch.tensor([
        [0.0, 9.0, 1.0, 8.0, 0.0, 0.0],  # after token 2: 1 then 3
        [5.0, 0.0, 0.0, 0.0, 7.0, 0.0],  # after token 3: 4 then 0
        [0.0, 0.0, 3.0, 0.0, 0.0, 4.0],  # after token 2 again (later in the tree): 5 then 2 -- wins
    ])
    recycle(matrix, [2, 3, 2], logits)
    assert matrix[2].tolist() == [5, 2] and matrix[3].tolist() == [4, 0]
    assert matrix[5].tolist() == [1, 1]  # rows of tokens not fed are kept


def test_ngram_table_counts_and_normalises():
    table = NGramTable(3)
    table.add([1, 2, 3, 1, 2, 3, 1, 2, 4])
    assert table.next_counts([9, 1, 2]) == {3: 2.0, 4: 1.0}
    assert table.prob([1, 2], 3) == pytest.approx(2 / 3)
    table.add([7, 1, 2, 4, 1, 2, 4, 1, 2, 5], start=5)  # only the n-grams starting at index >= 5
    assert table.next_counts([1, 2]) == {3: 2.0, 4: 1.0, 5: 1.0}
    with pytest.raises(ValueError):
        NGramTable(1)


def test_trigram_matrix_keeps_the_most_frequent_next_tokens_and_adapts():
    matrix = TrigramMatrix.from_corpus([[1, 2, 3, 1, 2, 3, 1, 2, 4], [1, 2, 5, 9]], width=2)
    tokens, probs, cumulative = matrix.row(matrix.rows[(1 << 21) | 2])
    assert tokens == [3, 4] and cumulative == [2, 3]  # 5 (once) loses the tie with 4 (once): lower id kept
    assert probs == pytest.approx([2 / 3, 1 / 3])
    matrix.add([7, 1, 2, 4, 1, 2, 4, 1, 2, 6], start=1)  # 1 2 4 twice more, then 1 2 6
    assert matrix.row(matrix.rows[(1 << 21) | 2])[0] == [4, 6]  # 4 is now first; 6 took the last place
    assert (7 << 21) | 1 not in matrix.rows  # the tri-gram starting before `start` was not counted
    assert len(TrigramMatrix.from_corpus([], 12)) == 0


def test_suffix_index_returns_the_longest_suffix_continuations_most_frequent_first():
    index = SuffixIndex([[1, 2, 3, 4, 5], [9, 2, 3, 4, 6], [7, 2, 3, 8]], min_n=2, max_n=3)
    assert index.continuations([0, 2, 3, 4], length=2, limit=5) == [[5], [6]]  # (2,3,4) matches twice
    assert index.continuations([0, 2, 3], length=2, limit=1) == [[4, 5]]  # (2,3): 4 5 / 4 6 / 8; ties keep order
    assert index.continuations([5, 5], length=2, limit=5) == []  # no continuation across sequences


def test_corpus_comes_from_the_setting_or_the_harness_never_from_a_suite(tmp_path, pair):
    tok = tiny_tokenizer()
    ctx = DecodeContext(prompt_ids=[4, 5], target=pair[0], sampling=Sampling(), max_new_tokens=4,
                        eos_token_ids=frozenset(), tokenizer=tok, corpus=["the cat reads"])
    assert corpus_sequences(ctx) == [tok("the cat reads")["input_ids"]]  # the texts the harness gives
    assert corpus_sequences(DecodeContext(prompt_ids=[4], target=pair[0], sampling=Sampling(), max_new_tokens=4,
                                          eos_token_ids=frozenset(), tokenizer=tok)) == []  # nothing given
    text = tmp_path / "corpus.txt"
    text.write_text("the robot paints\nthe cat reads\n")
    assert corpus_sequences(ctx, str(text)) == [tok("the robot paints")["input_ids"], tok("the cat reads")["input_ids"]]
    lines = tmp_path / "corpus.jsonl"
    lines.write_text('{"turns": ["the robot", "paints"]}\n{"text": "the cat"}\n')
    assert corpus_sequences(ctx, str(lines)) == [tok("the robot\npaints")["input_ids"], tok("the cat")["input_ids"]]
    for name in ("rasd", "aded", "superposed"):
        with pytest.raises(SettingError, match="corpus"):  # a missing file fails when the method is built
            get_method(name)(corpus=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("name,state_key", [("aded", "trigram_matrix"), ("rasd", "datastore"),
                                            ("superposed", "ngram_models"), ("swift", "layer_set_search")])
def test_state_lives_in_ctx_state_not_on_the_method(name, state_key, pair):
    """The method object keeps nothing across generations; the same ctx.state gives the same output."""
    method = get_method(name)(**({"context_window": 4} if name == "swift" else {}))
    before = copy.deepcopy(vars(method))

    def run(state):
        ctx = DecodeContext(prompt_ids=[4, 6, 9, 7, 8, 4, 6], target=pair[0], draft=pair[1], sampling=Sampling(),
                            max_new_tokens=16, eos_token_ids=frozenset(), tokenizer=tiny_tokenizer(),
                            corpus=["the robot paints the red house", "the cat reads"], state=state)
        return method.generate(ctx)

    state: dict = {}
    run(state)  # the first item builds (and may adapt) the state
    assert state_key in state and get_method(name).stateful
    snapshot = copy.deepcopy(state)
    first, second = run(copy.deepcopy(snapshot)), run(copy.deepcopy(snapshot))
    assert first == second
    assert vars(method).keys() == before.keys() == {"config"}


def test_aded_search_prefers_the_likely_continuation():
    matrix = TrigramMatrix.from_corpus([[1, 2, 3, 4, 5]] * 9 + [[1, 2, 7, 8, 9]], width=12)
    drafts = mcts_drafts(matrix, (1, 2), iterations=60, depth=3, top_k=4, rng=np.random.default_rng(0))
    assert drafts[0][0] == 3  # the most visited first move is the 9-to-1 favourite
    assert [3, 4, 5] in [d[:3] for d in drafts]
    assert any(d[0] == 7 for d in drafts)  # the unlikely branch is explored too
    assert mcts_drafts(TrigramMatrix(12), (1, 2), 10, 3, 4, np.random.default_rng(0)) == []


@pytest.mark.parametrize("name", ["token_recycling", "aded", "rasd", "layer_skip", "sps", "pld"])
def test_sampling_runs_and_repeats_with_a_seed(name, pair):
    def once():
        ctx = DecodeContext(prompt_ids=[4, 6, 9, 7, 8], target=pair[0], draft=pair[1], max_new_tokens=12,
                            sampling=Sampling(temperature=1.0, seed=3), eos_token_ids=frozenset())
        return get_method(name)().generate(ctx), ctx

    (first, ctx), (second, _) = once(), once()
    assert first == second and len(first) == 12 and sum(ctx.trace.accepted) == 12


@pytest.mark.parametrize("name,bad", [
    ("token_recycling", {"k": 0}), ("aded", {"depth": 0}), ("swift", {"skip_ratio": 1.5}), ("swift", {"skip_ratio": 1.0}),
    ("layer_skip", {"speedup": 0.5}), ("rasd", {"gamma": 0}), ("superposed", {"alpha": 1.0}), ("sps", {"gamma": 0}),
    ("pld", {"num_pred_tokens": 0}), ("hf_assisted", {"num_assistant_tokens": 0}), ("swift", {"bayes": "flase"}),
    ("layer_skip", {"draft_tokens": "2.5"})])
def test_bad_settings_fail_when_the_method_is_built(name, bad):
    with pytest.raises(ValueError, match=f"{name}.{next(iter(bad))}") as err:
        get_method(name)(**bad)
    assert name == "token_recycling" or isinstance(err.value, SettingError)  # its owner moves it to Config
