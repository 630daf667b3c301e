"""pytest-benchmark: the memory/energy trackers' own cost, on and off interleaved in one run.

`pytest -m bench tests/benchmarks/test_tracker_overhead.py -s`. The goal is under 2% of tokens/s.
DECODEBENCH_BENCH_TARGET picks the model (default: the embedded SmolLM2-135M, where per-token
work is smallest and so any overhead shows most); DECODEBENCH_BENCH_ROUNDS (3).
"""
from __future__ import annotations

import os

import pytest

from harness.runner import RunConfig, Runner, encode_chat

pytestmark = pytest.mark.bench


def test_tracker_overhead(benchmark, tmp_path):
    cfg = RunConfig(methods=["ar"], target=os.environ.get("DECODEBENCH_BENCH_TARGET", "smollm2-135m"),
                    draft=None, max_new_tokens=48, out=str(tmp_path))
    runner = Runner(cfg)
    runner._load_models()
    prompts = [encode_chat(runner.target.tokenizer, item.messages(0, [])) for item in runner.items[:6]]
    method = runner.methods["ar"]
    totals = {True: [0, 0.0], False: [0, 0.0]}
    runner._generate(method, prompts[0], seed=0, max_new_tokens=4)  # warm-up

    def alternate() -> None:
        for round_index in range(int(os.environ.get("DECODEBENCH_BENCH_ROUNDS", 3))):
            for prompt in prompts:
                for trackers in (True, False) if round_index % 2 == 0 else (False, True):
                    runner.cfg.trackers = trackers
                    record = runner._generate(method, prompt, seed=0, max_new_tokens=48)
                    totals[trackers][0] += record["new_tokens"]
                    totals[trackers][1] += record["wall_s"]

    benchmark.pedantic(alternate, rounds=1, iterations=1)
    on, off = (totals[k][0] / totals[k][1] for k in (True, False))
    overhead = 1 - on / off
    benchmark.extra_info.update(tokens_per_s_trackers_on=on, tokens_per_s_trackers_off=off, overhead=overhead)
    print(f"\ntrackers on {on:.2f} tok/s, off {off:.2f} tok/s: overhead {100 * overhead:.2f}% (goal < 2%)")
