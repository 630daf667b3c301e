"""Haystacks for the long-context suite: a stream of words (each with its leading space) that knows where its
sentences start, so needles go in between sentences and the fill can stop at any word."""
from __future__ import annotations

import bisect
import itertools
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from suites.sizing import PromptFormat
from suites.wordlists import NOISE_SENTENCES

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_AFTER_HYPHEN = re.compile(r"(?<=-)(?=.)")


def split_word(word: str) -> list[str]:
    """The pieces the fill may stop between: after each hyphen ('copper-', 'lantern'), and every 3 characters
    of a piece with digits (many tokenizers spend a token per digit, so a number or UUID would otherwise be
    too coarse a step)."""
    pieces = []
    for piece in _AFTER_HYPHEN.split(word):
        if any(c.isdigit() for c in piece):
            pieces += [piece[i:i + 3] for i in range(0, len(piece), 3)]
        else:
            pieces.append(piece)
    return pieces


@dataclass
class Haystack:
    units: list[str] = field(default_factory=list)  # " word" pieces
    starts: list[int] = field(default_factory=list)  # indices of units that begin a sentence
    prefix: list[int] = field(default_factory=lambda: [0])  # estimated tokens of units[:i]

    def extend(self, sentences: Iterator[list[str]], fmt: PromptFormat, tokens: int) -> None:
        """Append sentences until the units hold an estimated `tokens` tokens."""
        while self.prefix[-1] < tokens:
            batch: list[list[str]] = list(itertools.islice(sentences, max(8, min(256, (tokens - self.prefix[-1]) // 32))))
            if not batch:
                return
            for words in batch:
                self.starts.append(len(self.units))
                for word in words:
                    first, *rest = split_word(word)
                    self.units.append(" " + first)
                    self.units.extend(rest)
            counts = fmt.piece_counts(self.units[len(self.prefix) - 1:])
            self.prefix.extend(itertools.accumulate(counts, initial=self.prefix[-1]))
            del self.prefix[len(self.prefix) - len(counts) - 1]  # `initial` repeats the running total once

    def position(self, fraction: float, n: int, placed: Sequence[tuple[int, int]] = (), last: bool = False) -> int:
        """The sentence start among units[:n] (n itself counts: the end) nearest to `fraction` of the tokens of
        units[:n] plus those of the sentences `placed` (position, tokens) among them; `last`: this sentence
        goes after the placed ones at the same position (else before them)."""
        want = fraction * (self.prefix[n] + sum(t for _, t in placed))
        candidates = self.starts[:bisect.bisect_right(self.starts, n)] + [n]

        def before(i: int) -> int:
            return self.prefix[i] + sum(t for p, t in placed if p < i or (last and p == i))

        return min(candidates, key=lambda i: (abs(before(i) - want), i))

    def text(self, n: int, inserts: list[tuple[int, str, int]]) -> tuple[str, list[int]]:
        """units[:n] with each (position, sentence, tie) inserted before unit `position` (several at one
        position in order of `tie`); also the character offset where each inserted sentence starts (in the
        order given), in the stripped text."""
        order = sorted(range(len(inserts)), key=lambda j: (inserts[j][0], inserts[j][2]))
        parts: list[str] = []
        offsets = [0] * len(inserts)
        cursor, length = 0, 0
        for j in order:
            pos, sentence, _ = inserts[j]
            chunk = "".join(self.units[cursor:pos])
            parts.append(chunk)
            length += len(chunk)
            offsets[j] = length + 1  # after its leading space
            parts.append(" " + sentence)
            length += 1 + len(sentence)
            cursor = pos
        parts.append("".join(self.units[cursor:n]))
        text = "".join(parts)
        stripped = text.lstrip()
        cut = len(text) - len(stripped)
        return stripped.rstrip(), [max(o - cut, 0) for o in offsets]


def noise_sentences(rng: random.Random) -> Iterator[list[str]]:
    """The noise sentences, reshuffled every round, forever."""
    pool = list(NOISE_SENTENCES)
    while True:
        rng.shuffle(pool)
        for sentence in pool:
            yield sentence.split()


def generated_sentences(make: Callable[[random.Random], str], rng: random.Random) -> Iterator[list[str]]:
    while True:
        yield make(rng).split()


class TextSource:
    """A local text's words and sentence starts; a haystack reads it from a seeded sentence start, wrapping
    around at the end."""

    def __init__(self, text: str, where: str) -> None:
        self.words = text.split()
        if len(self.words) < 2:
            raise ValueError(f"{where}: too little text for a haystack ({len(self.words)} word(s))")
        self.starts = [0] + [i + 1 for i, w in enumerate(self.words[:-1]) if _SENTENCE_END.search(w)]
        # sentence ranges, each as a list of words
        bounds = self.starts + [len(self.words)]
        self.sentences = [self.words[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    def stream(self, rng: random.Random) -> Iterator[list[str]]:
        first = rng.randrange(len(self.sentences))
        for k in itertools.count():
            yield self.sentences[(first + k) % len(self.sentences)]
