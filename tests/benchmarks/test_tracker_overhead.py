"""pytest-benchmark: the memory/energy trackers' own cost, on and off interleaved in one run.

`pytest -m bench tests/benchmarks/test_tracker_overhead.py -s`. The goal is under 2% of tokens/s.
Two figures: the A/B difference in tokens/s (what a user feels, but as noisy as the machine) and the
trackers' own time (entering, leaving, sampler threads' CPU time) over the work's wall time, which
does not depend on the machine's noise. DECODEBENCH_BENCH_TARGET picks the model (default: the
embedded SmolLM2-135M, where per-token work is smallest and so any overhead shows most),
DECODEBENCH_BENCH_DRAFT adds `sps` with that draft, DECODEBENCH_BENCH_ROUNDS (3) and
DECODEBENCH_BENCH_TOKENS (48) size the work.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from harness.runner import RunConfig, Runner, encode_chat

pytestmark = pytest.mark.bench


def test_tracker_overhead(benchmark, tmp_path):
    draft = os.environ.get("DECODEBENCH_BENCH_DRAFT")
    tokens = int(os.environ.get("DECODEBENCH_BENCH_TOKENS", 48))
    cfg = RunConfig(methods=["ar", "sps"] if draft else ["ar"], draft=draft, max_new_tokens=tokens,
                    target=os.environ.get("DECODEBENCH_BENCH_TARGET", "smollm2-135m"), out=str(tmp_path))
    runner = Runner(cfg)
    runner._load_models()
    prompts = [encode_chat(runner.target.tokenizer, item.messages(0, [])) for item in runner.items[:6]]
    totals = {on: {"tokens": 0, "wall": 0.0, "own": 0.0} for on in (True, False)}
    pairs: list[tuple[float, float]] = []  # (tokens/s on, tokens/s off) of the same generation, back to back
    for method in runner.methods.values():
        runner._generate(method, prompts[0], seed=0, max_new_tokens=4)  # warm-up

    def alternate() -> None:
        for round_index in range(int(os.environ.get("DECODEBENCH_BENCH_ROUNDS", 3))):
            for prompt in prompts:
                for method in runner.methods.values():
                    speed = {}
                    for trackers in (True, False) if round_index % 2 == 0 else (False, True):
                        runner.cfg.trackers = trackers
                        record = runner._generate(method, prompt, seed=0, max_new_tokens=tokens)
                        totals[trackers]["tokens"] += record["new_tokens"]
                        totals[trackers]["wall"] += record["wall_s"]
                        totals[trackers]["own"] += record["tracker_s"]
                        speed[trackers] = record["tokens_per_s"]
                    pairs.append((speed[True], speed[False]))

    benchmark.pedantic(alternate, rounds=1, iterations=1)
    on, off = (totals[k]["tokens"] / totals[k]["wall"] for k in (True, False))
    overhead = 1 - on / off
    own_share = totals[True]["own"] / totals[True]["wall"]
    # 95% bootstrap interval of the A/B overhead over the back-to-back pairs: is it told apart from noise?
    on_off = np.array(pairs)
    draws = np.random.default_rng(0).integers(0, len(on_off), (2000, len(on_off)))
    low, high = np.percentile(1 - on_off[draws, 0].mean(1) / on_off[draws, 1].mean(1), [2.5, 97.5])
    benchmark.extra_info.update(tokens_per_s_trackers_on=on, tokens_per_s_trackers_off=off, overhead=overhead,
                                overhead_ci=[low, high], trackers_own_time_share=own_share)
    print(f"\ntrackers on {on:.3f} tok/s, off {off:.3f} tok/s: A/B overhead {100 * overhead:.2f}% "
          f"(95% CI over {len(pairs)} pairs [{100 * low:.2f}%, {100 * high:.2f}%]); "
          f"trackers' own time {1000 * totals[True]['own']:.1f} ms = {100 * own_share:.3f}% of "
          f"{totals[True]['wall']:.1f} s (goal < 2%)")
    assert totals[True]["own"] >= 0 and totals[False]["tokens"] == totals[True]["tokens"]
