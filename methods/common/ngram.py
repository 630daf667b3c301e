"""Finding a continuation of the current suffix earlier in the token sequence (prompt lookup)."""
from __future__ import annotations


def lookup_continuation(tokens: list[int], max_ngram: int, min_ngram: int, num_pred: int) -> list[int]:
    """The `num_pred` tokens that followed the first earlier occurrence of the longest suffix
    n-gram (n from `max_ngram` down to `min_ngram`); empty if none recurs. First, not most
    recent, occurrence: as in the prompt-lookup reference implementation."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n :]
        for start in range(length - n):  # the suffix itself is excluded
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + num_pred]
                if follow:
                    return follow
    return []
