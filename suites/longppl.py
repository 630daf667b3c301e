"""Documents for long-document perplexity (StreamingLLM's evaluation: one text longer than the window, scored
token by token or in chunks under each cache policy).

Items are documents (see suites/base.py): `turns == (text,)`. The built-in documents are generated town
chronicles (suites/chronicle.py, seeded), each cut at the first paragraph end past `length` tokens of the
target's tokenizer (about 4 characters a token when no tokenizer is given); `--data PATH` takes any local text,
folder of .txt files or jsonl (suites/documents.py), cut into `documents` consecutive pieces of about `length`
tokens (at the next line end). How a document is read (chunks on the cache, or a sliding window whose later
passes score a quarter of it by default) is `ReadingOptions` (suites/documents.py).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from methods.base import setting
from suites.base import Item, Suite, document, register
from suites.chronicle import Chronicle
from suites.documents import (
    CHARS_PER_TOKEN,
    ReadingOptions,
    count_tokens,
    cut,
    read_documents,
)


@dataclass
class LongPerplexityOptions(ReadingOptions):
    length: int = setting(16384, "tokens per document (about 2x SmolLM2's 8k window)", low=16, high=1 << 22)
    documents: int = setting(1, "documents (generated ones get seeds seed, seed+1, ...)", low=1, high=10_000)
    seed: int = setting(0, "seed of the generated documents")


@register("longppl")
class LongPerplexitySuite(Suite):
    needs = "loglikelihood"
    description = "long documents for perplexity against position (generated chronicle, or --data text)"
    Options = LongPerplexityOptions

    def __init__(self, data: str | None = None, tokenizer: Any = None, **options: Any) -> None:
        super().__init__(data, tokenizer, **options)
        self.sources = read_documents(data) if data else None

    def count(self, text: str) -> int | None:
        return count_tokens(self.tokenizer, text)

    def items(self, limit: int | None = None) -> list[Item]:
        wanted = min(self.options.documents, limit) if limit is not None else self.options.documents
        if self.sources is None:
            return [self._generated(i) for i in range(wanted)]
        docs: list[Item] = []
        for source in self.sources:
            docs += cut(source, self.tokenizer, self.options.length, wanted - len(docs))
        return docs

    def _generated(self, index: int) -> Item:
        seed = self.options.seed + index
        chronicle = Chronicle(random.Random(f"longppl:{seed}"))
        parts = [chronicle.title()]
        tokens, chars = self.count(parts[0]), len(parts[0])
        while (tokens if tokens is not None else chars / CHARS_PER_TOKEN) < self.options.length:
            paragraph = chronicle.paragraph()
            parts.append(paragraph)
            chars += len(paragraph)
            if tokens is not None:
                tokens += self.count(paragraph)  # paragraphs follow a blank line: their tokens add up
        text = "".join(parts).rstrip() + "\n"
        return document(f"chronicle-{seed}", text, meta={"source": "generated", "seed": seed,
                                                         "tokens": self.count(text), "chars": len(text)})
