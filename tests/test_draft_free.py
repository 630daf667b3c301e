"""Token Recycling's matrix and trees, ADED's search, and the n-gram stores, on hand-made examples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.aded import mcts_drafts
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


def test_ngram_table_counts_prunes_and_normalises():
    table = NGramTable(3)
    table.add([1, 2, 3, 1, 2, 3, 1, 2, 4])
    assert table.next_counts([9, 1, 2]) == {3: 2.0, 4: 1.0}
    assert table.prob([1, 2], 3) == pytest.approx(2 / 3)
    assert table.top([1, 2], 1) == [(3, pytest.approx(2 / 3))]
    table.add([7, 1, 2, 4, 1, 2, 4, 1, 2, 5], start=5)  # only the n-grams starting at index >= 5
    assert table.next_counts([1, 2]) == {3: 2.0, 4: 1.0, 5: 1.0}
    table.prune(2)
    assert table.next_counts([1, 2]) == {3: 2.0, 4: 1.0}  # a tie keeps the lower token id
    with pytest.raises(ValueError):
        NGramTable(1)


def test_suffix_index_returns_the_longest_suffix_continuations_most_frequent_first():
    index = SuffixIndex([[1, 2, 3, 4, 5], [9, 2, 3, 4, 6], [7, 2, 3, 8]], min_n=2, max_n=3)
    assert index.continuations([0, 2, 3, 4], length=2, limit=5) == [[5], [6]]  # (2,3,4) matches twice
    assert index.continuations([0, 2, 3], length=2, limit=1) == [[4, 5]]  # (2,3): 4 5 / 4 6 / 8; ties keep order
    assert index.continuations([5, 5], length=2, limit=5) == []  # no continuation across sequences


def test_corpus_is_the_built_in_question_set_by_default(tmp_path):
    tok = tiny_tokenizer()
    sequences = corpus_sequences(tok)
    assert len(sequences) == 48 and all(sequences)
    text = tmp_path / "corpus.txt"
    text.write_text("the robot paints\nthe cat reads\n")
    assert corpus_sequences(tok, str(text)) == [tok("the robot paints")["input_ids"], tok("the cat reads")["input_ids"]]
    with pytest.raises(FileNotFoundError):
        corpus_sequences(tok, str(tmp_path / "missing.txt"))


def test_aded_search_prefers_the_likely_continuation():
    table = NGramTable(3)
    for _ in range(9):
        table.add([1, 2, 3, 4, 5])
    table.add([1, 2, 7, 8, 9])
    drafts = mcts_drafts(table, (1, 2), iterations=60, depth=3, top_k=4, rng=np.random.default_rng(0))
    assert drafts[0][0] == 3  # the most visited first move is the 9-to-1 favourite
    assert [3, 4, 5] in [d[:3] for d in drafts]
    assert any(d[0] == 7 for d in drafts)  # the unlikely branch is explored too
    assert mcts_drafts(NGramTable(3), (1, 2), 10, 3, 4, np.random.default_rng(0)) == []


@pytest.mark.parametrize("name", ["token_recycling", "aded", "rasd", "layer_skip"])
def test_sampling_runs_and_repeats_with_a_seed(name, pair):
    from methods.base import DecodeContext, Sampling, get_method

    def once():
        ctx = DecodeContext(prompt_ids=[4, 6, 9, 7, 8], target=pair[0], draft=pair[1], max_new_tokens=12,
                            sampling=Sampling(temperature=1.0, seed=3), eos_token_ids=frozenset())
        return get_method(name)().generate(ctx), ctx

    (first, ctx), (second, _) = once(), once()
    assert first == second and len(first) == 12 and sum(ctx.trace.accepted) == 12


@pytest.mark.parametrize("name,bad", [("token_recycling", {"k": 0}), ("aded", {"depth": 0}), ("swift", {"skip_ratio": 1.5}),
                                      ("layer_skip", {"speedup": 0.5}), ("rasd", {"gamma": 0}), ("superposed", {"alpha": 1.0})])
def test_bad_settings_fail_when_the_method_is_built(name, bad):
    from methods.base import get_method

    with pytest.raises(ValueError):
        get_method(name)(**bad)
