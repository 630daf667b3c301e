"""pytest-benchmark: our `ar` and `sps` against transformers' `generate` and assisted generation.

Run with `pytest -m bench tests/benchmarks` (or `tox -e bench`). Models and sizes come from the
environment: DECODEBENCH_BENCH_TARGET / _DRAFT (default: the embedded Qwen 1.5B / 0.5B pair),
DECODEBENCH_BENCH_ITEMS (prompts, one per category; default 6), DECODEBENCH_BENCH_TOKENS (32).
The last test prints tokens/s ratios ours/transformers; the goal is >= 0.95 for both pairs.
"""
from __future__ import annotations

import json
import os

import pytest

from harness import models
from harness.runner import encode_chat
from methods.base import DecodeContext, Sampling, get_method
from suites.base import get_suite

pytestmark = pytest.mark.bench
PAIRS = {"ar": "hf_generate", "sps": "hf_assisted"}
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    target = models.load(os.environ.get("DECODEBENCH_BENCH_TARGET", models.DEFAULT_TARGET))
    draft = models.load(os.environ.get("DECODEBENCH_BENCH_DRAFT", models.DEFAULT_DRAFT))
    models.check_same_tokenizer(target, draft)
    items = get_suite("specbench")().items(limit=1)[: int(os.environ.get("DECODEBENCH_BENCH_ITEMS", 6))]
    prompts = [encode_chat(target.tokenizer, item.messages(0, [])) for item in items]
    return target, draft, prompts, int(os.environ.get("DECODEBENCH_BENCH_TOKENS", 32))


def decode_all(name, target, draft, prompts, max_new_tokens) -> int:
    method, produced = get_method(name)(), 0
    for prompt in prompts:
        ctx = DecodeContext(prompt_ids=prompt, target=target.model, draft=draft.model, sampling=Sampling(),
                            max_new_tokens=max_new_tokens, eos_token_ids=models.eos_ids(target))
        produced += len(method.generate(ctx))
    return produced


@pytest.mark.parametrize("name", ["ar", "hf_generate", "sps", "hf_assisted"])
def test_tokens_per_second(benchmark, setup, name):
    target, draft, prompts, max_new_tokens = setup
    decode_all(name, target, draft, prompts[:1], 4)  # warm-up
    tokens = benchmark.pedantic(decode_all, args=(name, target, draft, prompts, max_new_tokens),
                                rounds=1, iterations=1)
    MEASURED[name] = tokens / benchmark.stats.stats.mean
    benchmark.extra_info.update(tokens=tokens, tokens_per_s=MEASURED[name])


def test_ratios_against_transformers(benchmark):
    missing = [n for pair in PAIRS.items() for n in pair if n not in MEASURED]
    if missing:
        pytest.skip(f"run the whole module: {missing} not measured")
    ratios = {f"{ours}/{theirs}": MEASURED[ours] / MEASURED[theirs] for ours, theirs in PAIRS.items()}
    benchmark.extra_info.update(ratios)
    benchmark(lambda: None)  # the figures live in extra_info; nothing here is timed
    print("\ntokens/s:", json.dumps({k: round(v, 3) for k, v in MEASURED.items()}))
    print("ratios ours/transformers (goal >= 0.95):", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
