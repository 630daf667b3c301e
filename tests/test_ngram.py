from methods.common.ngram import lookup_continuation


def test_longest_suffix_match_wins_and_first_occurrence_is_used():
    tokens = [1, 2, 3, 9, 9, 7, 2, 3, 4, 4, 1, 2, 3]
    # suffix (1,2,3) occurs at 0 -> continuation starts at 3
    assert lookup_continuation(tokens, 3, 1, 4) == [9, 9, 7, 2]


def test_falls_back_to_shorter_ngrams_and_to_nothing():
    assert lookup_continuation([5, 6, 7, 6], 3, 1, 2) == [7, 6]
    assert lookup_continuation([1, 2, 3, 4], 3, 1, 5) == []
    assert lookup_continuation([4], 3, 1, 5) == []


def test_continuation_is_cut_at_num_pred():
    assert lookup_continuation([1, 2, 3, 4, 5, 6, 1, 2], 2, 1, 3) == [3, 4, 5]
