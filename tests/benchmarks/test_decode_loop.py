"""pytest-benchmark: every registered method's decode loop, timed by pytest-benchmark, counted by the harness.

    pytest --benchmark-only tests/benchmarks/test_decode_loop.py --benchmark-json runs/bench.json
    decodebench report --pytest-benchmark runs/bench.json

One benchmark per registered method on a tiny random pair (2 layers, hidden 64, built in code), and, marked
`integration`, a few methods on the embedded SmolLM2-135M (`ar`, the draft-free `pld` and `token_recycling`,
and `sps` with SmolLM2 as its own draft: every draft token accepted, so it shows the loop's own cost). A round
is one greedy generation of every prompt through the runner (`Runner._generate`: the harness's pass counters,
no memory/energy samplers), so pytest-benchmark's statistics are per-round times; `extra_info` carries what
the harness measured over the timed rounds: tokens/s (its wall time), mean accepted tokens per target pass
(pooled as the report's #MAT) and target calls, never figures a method reports about itself. The
report turns the saved JSON into a table with the speed-up over `ar`.

Deselected by default (the `bench` marker, tests/conftest.py); `--benchmark-only` or `-m bench` selects it.
DECODEBENCH_BENCH_ROUNDS (3) and DECODEBENCH_BENCH_TOKENS (24; 32 on SmolLM2) size the work.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from harness import models
from harness.runner import RunConfig, Runner, _steps, encode_chat
from methods.base import registry

pytestmark = pytest.mark.bench

PROMPTS = [
    {"question_id": "loop-1", "category": "qa", "turns": ["the robot paints the red house and the cat reads"]},
    {"question_id": "loop-2", "category": "math_reasoning", "turns": ["one plus two equals three so the answer is"]},
]
# prompt restructurers: they rebuild a suite's prompt from its item meta, which plain chat items lack
NEEDS_SUITE = {"jrt_prompt": "longctx", "rdsca": "icl"}
SMOLLM = "smollm2-135m"
SMOLLM_METHODS = ["ar", "pld", "token_recycling", "sps"]  # sps: SmolLM2 drafts for itself


def rounds() -> int:
    return int(os.environ.get("DECODEBENCH_BENCH_ROUNDS", 3))


def make_runner(tmp_path, target: str, draft: str | None, methods: list[str]) -> Runner:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    cfg = RunConfig(methods=methods, target=target, draft=draft, data=str(data), trackers=False,
                    out=str(tmp_path / "run"), max_new_tokens=1)
    runner = Runner(cfg)
    runner._load_models()
    return runner


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory, model_dirs):
    torch.set_num_threads(1)  # steadier timings; the forward passes are tiny anyway
    methods = [m for m in registry() if m not in NEEDS_SUITE]
    return make_runner(tmp_path_factory.mktemp("loop"), model_dirs[0], model_dirs[1], methods)


@pytest.fixture(scope="module")
def smollm_runner(tmp_path_factory):
    if not models.installed(models.EMBEDDED[SMOLLM]):
        pytest.skip(f"{SMOLLM} not installed: decodebench models install {SMOLLM}")
    return make_runner(tmp_path_factory.mktemp("loop-smollm"), SMOLLM, SMOLLM, SMOLLM_METHODS)


def bench_decode_loop(benchmark, runner: Runner, name: str, label: str, max_new_tokens: int) -> None:
    method = runner.methods[name]
    prompts = [(encode_chat(runner.target.tokenizer, item.messages(0, [])), item.meta) for item in runner.items]
    state: dict = {}  # a stateful method keeps its state over rounds, as over a run's items (hot start)
    generated: list[dict] = []

    def one_round() -> None:
        for ids, meta in prompts:
            record = runner._generate(method, ids, seed=0, max_new_tokens=max_new_tokens, state=state,
                                      item_meta=meta)
            generated.append(record)

    benchmark.group = f"decode loop: {label}"
    benchmark.pedantic(one_round, rounds=rounds(), iterations=1, warmup_rounds=1)
    timed = generated[len(prompts):]  # the warm-up round is not measured
    tokens = sum(r["new_tokens"] for r in timed)
    steps = sum(_steps(r["target_calls"], r["prefill_calls"]) for r in timed)
    assert tokens > 0 and steps > 0, f"{name} generated nothing"
    benchmark.extra_info.update(
        decodebench="decode_loop", method=name, model=label, prompts=len(prompts), max_new_tokens=max_new_tokens,
        new_tokens_per_round=tokens / rounds(),
        tokens_per_s=tokens / sum(r["wall_s"] for r in timed),
        mean_accepted=tokens / steps,
        target_calls_per_round=sum(r["target_calls"] for r in timed) / rounds(),
        draft_calls_per_round=sum(r["draft_calls"] for r in timed) / rounds(),
    )


@pytest.mark.parametrize("name", [m for m in registry() if m not in NEEDS_SUITE])
def test_decode_loop_tiny(benchmark, tiny_runner, name):
    bench_decode_loop(benchmark, tiny_runner, name, "tiny random pair",
                      int(os.environ.get("DECODEBENCH_BENCH_TOKENS", 24)))


@pytest.mark.integration
@pytest.mark.parametrize("name", SMOLLM_METHODS)
def test_decode_loop_smollm(benchmark, smollm_runner, name):
    bench_decode_loop(benchmark, smollm_runner, name, SMOLLM, int(os.environ.get("DECODEBENCH_BENCH_TOKENS", 32)))
