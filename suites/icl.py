"""A small in-context classification suite (for `rdsca`, Gong et al., arXiv 2310.19572, and its plain
in-context baseline). Three tasks, every example written for this project (suites/data/icl.jsonl):
sentiment of short reviews (positive/negative, 60), topic of a sentence (sports/science/business/food, 64),
fact or opinion (48).

An item is one pool example as the query with `shots` demonstrations drawn (seeded, per item) from the rest
of the task's pool, in the plain format
    Review: <text>\\nSentiment: <label>\\n\\n ... Review: <query>\\nSentiment:
The prompt is given to the model as it is (no chat template: `prompt_ids`, the tokenizer's own BOS).
What a demonstration-aware method needs is in meta: the demonstrations as strings, their character spans
and, with the tokenizer, their token spans [start, end) in `prompt_ids(item)`; the query's too.

Scoring. `score_choices(item, loglikelihoods)`: the label whose continuation (" positive") the model gives
the highest log-likelihood is the prediction: metric `label_loglikelihood`, the usual way in-context
classification is scored (Min et al. 2022 and the ICL-analysis papers RDSCA builds on). RDSCA's own text
was not reachable from this machine, so that it scores this way is an assumption, not a checked fact.
`score(item, text)`: the first generated word equals the label (case and punctuation aside): metric
`first_word_match`, for generation-only runs.
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods.base import SettingError, Settings, setting
from suites.base import Item, Suite, SuiteDataError, read_text_file, register

BUILTIN = Path(__file__).parent / "data" / "icl.jsonl"
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Task:
    field: str  # what the input is called in the prompt
    answer: str  # what the label is called
    labels: tuple[str, ...]


TASKS = {
    "sentiment": Task("Review", "Sentiment", ("positive", "negative")),
    "topic": Task("Sentence", "Topic", ("sports", "science", "business", "food")),
    "fact_opinion": Task("Statement", "Type", ("fact", "opinion")),
}


@dataclass
class IclOptions(Settings):
    tasks: tuple[str, ...] = setting(tuple(TASKS), "tasks: " + ", ".join(TASKS))
    shots: int = setting(4, "demonstrations per item", low=0, high=32)
    seed: int = setting(0, "seed of the item order and of each item's demonstrations")

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise SettingError(f"tasks: unknown task {', '.join(unknown)}; known: {', '.join(TASKS)}")
        self.tasks = tuple(dict.fromkeys(self.tasks))


def load_pool(path: Path) -> dict[str, list[tuple[str, str]]]:
    """task -> [(text, label)] in file order; a malformed line is an error naming it."""
    pool: dict[str, list[tuple[str, str]]] = {t: [] for t in TASKS}
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task, text, label = row["task"], row["text"], row["label"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SuiteDataError(f"{path}:{lineno}: expected a JSON object with task, text, label") from None
        if task not in TASKS or label not in TASKS[task].labels:
            raise SuiteDataError(f"{path}:{lineno}: unknown task {task!r} or label {label!r}")
        pool[task].append((text, label))
    return pool


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(string.punctuation).lower() if words else ""


@register("icl")
class InContextSuite(Suite):
    description = "in-context classification (sentiment, topic, fact/opinion) with k seeded demonstrations"
    needs_tokenizer = True
    Options = IclOptions

    def __init__(self, data: str | None = None, tokenizer: Any = None, **options: Any) -> None:
        super().__init__(data, tokenizer, **options)
        self.pool = load_pool(Path(data) if data else BUILTIN)
        for task in self.options.tasks:
            if len(self.pool[task]) <= self.options.shots:
                raise SettingError(f"icl.shots: {self.options.shots} demonstrations need more than "
                                   f"{len(self.pool[task])} {task} examples")

    def items(self, limit: int | None = None) -> list[Item]:
        out = []
        for task in self.options.tasks:
            order = list(range(len(self.pool[task])))
            random.Random(f"icl:{self.options.seed}:{task}").shuffle(order)  # mixed labels under --limit
            out += [self.item(task, i) for i in order[:limit]]
        return out

    def item(self, task: str, index: int) -> Item:
        spec, pool = TASKS[task], self.pool[task]
        rng = random.Random(f"icl:{self.options.seed}:{task}:{index}")
        others = [j for j in range(len(pool)) if j != index]
        demos = [f"{spec.field}: {pool[j][0]}\n{spec.answer}: {pool[j][1]}" for j in rng.sample(others, self.options.shots)]
        query = f"{spec.field}: {pool[index][0]}\n{spec.answer}:"
        prompt = SEPARATOR.join([*demos, query])
        spans, at = [], 0
        for part in [*demos, query]:
            spans.append([at, at + len(part)])
            at += len(part) + len(SEPARATOR)
        gold = pool[index][1]
        meta = {"task": task, "labels": list(spec.labels), "label": gold, "shots": self.options.shots,
                "demonstrations": demos, "demo_spans": spans[:-1], "query_span": spans[-1], "separator": SEPARATOR,
                "metric": "label_loglikelihood", "max_new_tokens": 3}
        if self.tokenizer is not None:
            token_spans = self._token_spans(prompt, spans)
            meta["demo_token_spans"], meta["query_token_span"] = token_spans[:-1], token_spans[-1]
        return Item(f"{task}-{index:03d}", task, (prompt,), (gold,), meta=meta)

    def _token_spans(self, prompt: str, spans: list[list[int]]) -> list[list[int]]:
        """Each character span as the token span [start, end) of the tokens that overlap it in prompt_ids."""
        enc = self.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        offsets = [(a, b) for a, b in enc["offset_mapping"]]
        out = []
        for start, end in spans:
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            out.append([inside[0], inside[-1] + 1] if inside else [0, 0])
        return out

    def prompt_ids(self, item: Item) -> list[int]:
        return self.tokenizer(item.turns[0], add_special_tokens=True)["input_ids"]

    @staticmethod
    def choices(item: Item) -> list[str]:
        """The continuations to score, one per label, in `meta['labels']` order."""
        return [" " + label for label in item.meta["labels"]]

    def score_choices(self, item: Item, loglikelihoods: list[float]) -> tuple[float, str]:
        """1 if the label with the highest log-likelihood (one per `choices(item)`) is the gold label."""
        labels = item.meta["labels"]
        if len(loglikelihoods) != len(labels):
            raise ValueError(f"{item.item_id}: {len(loglikelihoods)} log-likelihoods for {len(labels)} labels")
        best = max(range(len(labels)), key=lambda i: loglikelihoods[i])
        return float(labels[best] == item.meta["label"]), "label_loglikelihood"

    def score(self, item: Item, output_text: str) -> tuple[float, str]:
        return float(first_word(output_text) == item.meta["label"]), "first_word_match"
