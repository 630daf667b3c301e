"""N-gram mechanics: prompt lookup (a continuation of the current suffix earlier in the context),
n-gram count tables, a suffix index over a corpus, and the corpus they are built from."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from methods.base import DecodeContext, SettingError


def lookup_continuation(tokens: list[int], max_ngram: int, min_ngram: int, num_pred: int) -> list[int]:
    """The `num_pred` tokens that followed the first earlier occurrence of the longest suffix
    n-gram (n from `max_ngram` down to `min_ngram`); empty if none recurs. First, not most
    recent, occurrence: as in the prompt-lookup reference implementation."""
    length = len(tokens)
    if length < 2 or num_pred < 1:
        return []
    context = np.asarray(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        starts = ngram_starts(context, n)
        if len(starts):
            start = int(starts[0])
            return tokens[start + n : start + n + num_pred]
    return []


def ngram_starts(context: np.ndarray, n: int) -> np.ndarray:
    """Where the last `n` tokens of `context` occur earlier (each start < len - n, so at least one token
    follows), in order: n vectorised comparisons instead of a Python scan of the context."""
    length = len(context)
    match = context[: length - n] == context[length - n]
    for j in range(1, n):
        match &= context[j : length - n + j] == context[length - n + j]
    return np.flatnonzero(match)


class NGramTable:
    """Counts of the token that follows each (n-1)-token context: the n-gram models Superposed Decoding
    interpolates with. Counts, not probabilities, so that new text can be added at any time; `prob`
    normalises on the fly."""

    def __init__(self, n: int) -> None:
        if n < 2:
            raise ValueError(f"an n-gram table needs n >= 2, got {n}")
        self.n = n
        self.counts: dict[tuple[int, ...], dict[int, float]] = {}

    def add(self, tokens: Sequence[int], weight: float = 1.0, start: int = 0) -> None:
        """Count every n-gram of `tokens` whose last token is at index >= `start` + n - 1."""
        k = self.n - 1
        for i in range(max(start, 0), len(tokens) - k):
            row = self.counts.setdefault(tuple(tokens[i:i + k]), {})
            nxt = int(tokens[i + k])
            row[nxt] = row.get(nxt, 0.0) + weight

    def next_counts(self, context: Sequence[int]) -> dict[int, float]:
        return self.counts.get(tuple(context[-(self.n - 1):]), {})

    def prob(self, context: Sequence[int], token: int) -> float:
        row = self.next_counts(context)
        total = sum(row.values())
        return row.get(int(token), 0.0) / total if total else 0.0

    def __len__(self) -> int:
        return len(self.counts)


class SuffixIndex:
    """Where every n-gram (n in [min_n, max_n]) of a token corpus starts: a datastore to retrieve
    continuations of the current suffix from (REST-style retrieval, by hash instead of suffix array)."""

    def __init__(self, sequences: Sequence[Sequence[int]], min_n: int = 2, max_n: int = 4,
                 max_positions: int = 64) -> None:
        self.min_n, self.max_n, self.max_positions = min_n, max_n, max_positions
        self.tokens = np.array([t for seq in sequences for t in list(seq) + [-1]], dtype=np.int64)  # -1 separates
        self.starts: dict[tuple[int, ...], list[int]] = {}
        tokens = self.tokens.tolist()
        for n in range(min_n, max_n + 1):
            for i in range(len(tokens) - n):
                key = tuple(tokens[i:i + n])
                if -1 in key:
                    continue
                where = self.starts.setdefault(key, [])
                if len(where) < max_positions:
                    where.append(i)

    def continuations(self, context: Sequence[int], length: int, limit: int) -> list[list[int]]:
        """Up to `limit` distinct continuations (at most `length` tokens each) of the longest suffix of
        `context` found in the corpus, most frequent first."""
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            where = self.starts.get(tuple(int(t) for t in context[-n:]))
            if not where:
                continue
            seen: dict[tuple[int, ...], int] = {}
            for start in where:
                follow = []
                for tok in self.tokens[start + n:start + n + length].tolist():
                    if tok < 0:
                        break
                    follow.append(tok)
                if follow:
                    seen[tuple(follow)] = seen.get(tuple(follow), 0) + 1
            if seen:
                ranked = sorted(seen.items(), key=lambda kv: -kv[1])[:limit]
                return [list(seq) for seq, _ in ranked]
        return []


def corpus_sequences(ctx: DecodeContext, path: str = "") -> list[list[int]]:
    """Token ids of a method's corpus, one sequence per text: the file its `corpus` setting names, else
    the texts the harness passes in `ctx.corpus` (the suite's prompts). No method reads a suite's data
    itself. Empty without a tokenizer (a bare model): the stores then learn from the output alone."""
    texts = read_corpus(path) if path else list(ctx.corpus)
    if ctx.tokenizer is None:
        return []
    return [ctx.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts if text]


def read_corpus(path: str) -> list[str]:
    """Texts of a corpus file: one per line, or per .jsonl record ("turns" joined by newlines, or "text")."""
    file = Path(path)
    texts = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            record = json.loads(line)
            texts.append("\n".join(record.get("turns") or [record.get("text", "")]))
        else:
            texts.append(line)
    return texts


def check_corpus(path: str) -> None:
    """A `corpus` setting names a readable file or nothing (checked when the method is built)."""
    if path and not Path(path).is_file():
        raise SettingError(f"corpus names no file: {path!r}")
