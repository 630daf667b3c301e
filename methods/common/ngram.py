"""N-gram mechanics: prompt lookup (a continuation of the current suffix earlier in the context),
n-gram count tables, a suffix index over a corpus, and the local corpus they are built from."""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


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


class NGramTable:
    """Counts of the token that follows each (n-1)-token context: the tri-gram "matrix" of ADED (n=3),
    the n-gram models Superposed Decoding interpolates with. Counts, not probabilities, so that new
    text (verified output) can be added at any time; `top` and `prob` normalise on the fly."""

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

    def top(self, context: Sequence[int], k: int) -> list[tuple[int, float]]:
        """The k most frequent next tokens with their probabilities, most likely first (ties: lower id)."""
        row = self.next_counts(context)
        total = sum(row.values())
        best = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [(tok, count / total) for tok, count in best]

    def prune(self, k: int) -> None:
        """Keep the k most frequent next tokens of every context (ADED keeps 12)."""
        for context, row in self.counts.items():
            if len(row) > k:
                self.counts[context] = dict(sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k])

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
        for n in range(min_n, max_n + 1):
            for i in range(len(self.tokens) - n):
                key = tuple(self.tokens[i:i + n].tolist())
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


def corpus_sequences(tokenizer, path: str | None = None) -> list[list[int]]:
    """Token ids of a local text corpus, one sequence per line (a .jsonl line's "turns" are joined).

    Default: the turns of the built-in Spec-Bench-style question set shipped in suites/data (read as a
    data file; no suite code is imported). It holds the benchmark's own prompts, which prompt lookup
    sees anyway; it holds no reference answers. Pass a file of your own text for a real datastore."""
    if tokenizer is None:
        raise ValueError("building an n-gram store from a corpus needs the target's tokenizer")
    file = Path(path) if path else Path(importlib.util.find_spec("suites").origin).parent / "data" / "specbench.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"corpus file {file} does not exist")
    lines = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            record = json.loads(line)
            lines.append("\n".join(record.get("turns") or [record.get("text", "")]))
        else:
            lines.append(line)
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in lines]
