"""Output quality, shared by every method: the target's perplexity of what a method generated, and a
task score per Spec-Bench category where the item carries a reference.

Perplexity is what MJSD and DSBD report: exp of the mean negative log-likelihood of the new tokens
(EOS included when emitted) under the TARGET model's raw distribution (temperature 1, no top-k/top-p),
given the prompt. The harness computes it after generation, outside the method's timing and counts.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import torch


def output_perplexity(model: torch.nn.Module, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> float | None:
    """exp(mean NLL) of `output_ids` after `prompt_ids` under `model`, in one forward pass; None if no output."""
    if not output_ids:
        return None
    ids = torch.tensor([list(prompt_ids) + list(output_ids)], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        # rows for the last len(output)+1 positions: row j predicts token prompt_len - 1 + j + 1
        logits = model(input_ids=ids, logits_to_keep=len(output_ids) + 1).logits[0, :-1].float()
    targets = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="mean")
    return float(torch.exp(nll))


# ---------------------------------------------------------------- task scores

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators dropped), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def number_exact_match(prediction: str, reference: str) -> float:
    """1.0 if the prediction's final number equals the reference's number, else 0.0."""
    expected, got = final_number(reference), final_number(prediction)
    if expected is None:
        raise ValueError(f"math reference {reference!r} holds no number")
    return float(got is not None and math.isclose(got, expected, rel_tol=0, abs_tol=1e-9))


def _normalize_answer(text: str) -> list[str]:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces; then the tokens."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between a prediction and one reference answer."""
    pred, ref = _normalize_answer(prediction), _normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Porter stemming), from Google's rouge-score package."""
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure)


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF from sacrebleu, scaled to 0..1."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(prediction, [reference]).score) / 100.0


# category -> (metric name, scorer(prediction, reference) -> 0..1)
CATEGORY_METRICS: dict[str, tuple[str, Callable[[str, str], float]]] = {
    "math_reasoning": ("exact_match", number_exact_match),
    "summarization": ("rougeL", rouge_l),
    "translation": ("chrF", chrf),
    "qa": ("token_f1", token_f1),
    "rag": ("token_f1", token_f1),
}


def references_for_turn(references: Sequence[str] | None, turns: int, turn: int) -> list[str]:
    """The references a turn is scored against. A one-turn item: all of them (alternatives). A multi-turn
    item: the reference of that turn when there is one per turn (MT-Bench's convention), else none."""
    if not references:
        return []
    if turns == 1:
        return list(references)
    return [references[turn]] if len(references) == turns else []


def task_score(category: str, prediction: str, references: Sequence[str]) -> tuple[float | None, str | None]:
    """(score in 0..1, metric name) for a category with a metric and at least one reference, else (None, None).
    Several references: the best score counts."""
    if category not in CATEGORY_METRICS or not references:
        return None, None
    metric, scorer = CATEGORY_METRICS[category]
    return max(scorer(prediction, reference) for reference in references), metric
