"""pytest-benchmark: our `ar` and `sps` against transformers' `generate` and assisted generation.

Run with `pytest -m bench tests/benchmarks -s` (or `tox -e bench`). Each pair is measured
interleaved (ours, theirs, then theirs, ours on the next round) on the same prompts, so machine
drift hits both alike; the ratio ours/transformers (tokens/s) goes into the benchmark's extra_info
and is printed. The goal is >= 0.95; this is a measurement, not a pass/fail test.

Environment: DECODEBENCH_BENCH_TARGET / _DRAFT (default: the embedded Qwen 1.5B / 0.5B pair),
DECODEBENCH_BENCH_ITEMS (prompts, one per category; 6), DECODEBENCH_BENCH_TOKENS (32),
DECODEBENCH_BENCH_ROUNDS (2).
"""
from __future__ import annotations

import os
import time

import pytest

from harness import models
from harness.runner import encode_chat
from methods.base import DecodeContext, Sampling, get_method
from suites.base import get_suite

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def setup():
    target = models.load(os.environ.get("DECODEBENCH_BENCH_TARGET", models.DEFAULT_TARGET))
    draft = models.load(os.environ.get("DECODEBENCH_BENCH_DRAFT", models.DEFAULT_DRAFT))
    models.check_same_tokenizer(target, draft)
    items = get_suite("specbench")().items(limit=1)[: int(os.environ.get("DECODEBENCH_BENCH_ITEMS", 6))]
    prompts = [encode_chat(target.tokenizer, item.messages(0, [])) for item in items]
    return target, draft, prompts


def timed_decode(name: str, target, draft, prompt: list[int], max_new_tokens: int) -> tuple[int, float]:
    ctx = DecodeContext(prompt_ids=prompt, target=target.model, draft=draft.model, sampling=Sampling(),
                        max_new_tokens=max_new_tokens, eos_token_ids=models.eos_ids(target))
    method = get_method(name)()
    start = time.perf_counter()
    method.generate(ctx)
    return len(ctx.output), time.perf_counter() - start


@pytest.mark.parametrize("ours,theirs", [("ar", "hf_generate"), ("sps", "hf_assisted")])
def test_tokens_per_second_against_transformers(benchmark, setup, ours, theirs):
    target, draft, prompts = setup
    max_new_tokens = int(os.environ.get("DECODEBENCH_BENCH_TOKENS", 32))
    rounds = int(os.environ.get("DECODEBENCH_BENCH_ROUNDS", 2))
    totals = {ours: [0, 0.0], theirs: [0, 0.0]}
    for name in totals:  # warm-up
        timed_decode(name, target, draft, prompts[0], 4)

    def alternate() -> None:
        for round_index in range(rounds):
            for prompt in prompts:
                for name in (ours, theirs) if round_index % 2 == 0 else (theirs, ours):
                    tokens, seconds = timed_decode(name, target, draft, prompt, max_new_tokens)
                    totals[name][0] += tokens
                    totals[name][1] += seconds

    benchmark.pedantic(alternate, rounds=1, iterations=1)
    speed = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    ratio = speed[ours] / speed[theirs]
    benchmark.extra_info.update({f"{n}_tokens_per_s": s for n, s in speed.items()}, ratio=ratio)
    print(f"\n{ours} {speed[ours]:.3f} tok/s, {theirs} {speed[theirs]:.3f} tok/s: "
          f"ratio {ratio:.3f} (goal >= 0.95)")
