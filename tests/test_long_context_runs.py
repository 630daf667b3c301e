"""Long-context suites through the runner on tiny models: prompts sized by the target's tokenizer, RULER
scores, cache policies composed with decoders, the KV cache measured by the harness, and perplexity of a
document read on the cache or in sliding windows."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import WORDS, tiny_llama

from harness import cli, likelihood
from harness.results import read_records


def records(out):
    return {(r["method"], r["item_id"]): r for r in read_records(out / "results.jsonl")}


def test_longctx_runs_policies_and_measures_the_kv_cache(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", "--suite", "longctx", "--target", model_dirs[0], "--methods", "ar,streaming_llm",
                     "--lengths", "200", "--depths", "50", "--tasks", "niah_single,vt", "--max-new-tokens", "8",
                     "--set", "streaming_llm.sinks=2", "--set", "streaming_llm.window=40",
                     "--set", "streaming_llm.prefill_chunk=32", "--no-warmup", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    found = records(out)
    assert {m for m, _ in found} == {"ar", "streaming_llm"} and len(found) == 4
    for (method, _), r in found.items():
        assert not r["error"], r["error"]
        assert r["item_meta"]["length"] == 200 and abs(r["prompt_tokens"] - 200) <= 3
        assert r["task_metric"] == "string_match_all" and 0 <= r["task_score"] <= 1
        assert r["decoder"] == "ar" and r["policy"] == (None if method == "ar" else "streaming_llm")
        assert r["kv_cache_peak_bytes"] >= r["kv_cache_final_bytes"] > 0
        # a prompt prefilled in chunks of 32 is one decoding step: the trace agrees, ar accepts 1 per step
        chunks = -(-r["prompt_tokens"] // 32) if method == "streaming_llm" else 1
        assert r["prefill_calls"] == chunks and r["trace_error"] is None
        assert r["target_calls"] == chunks + r["new_tokens"] - 1 and r["mean_accepted"] == 1.0
        assert r["prefill_s"] == pytest.approx(sum(r["target_pass_s"][:chunks]), rel=0.5)
        assert (r["policy_state_bytes"] is None) == (method == "ar")  # measured only where a policy ran
    # the tiny target: 2 layers x keys+values x 2 KV heads x head_dim 16 x float32 = 512 bytes a token
    per_token = 2 * 2 * 2 * 16 * 4
    ar, streaming = found[("ar", "niah_single-200-d50-s0")], found[("streaming_llm", "niah_single-200-d50-s0")]
    assert ar["kv_cache_final_bytes"] == per_token * (ar["prompt_tokens"] + ar["new_tokens"] - 1)
    assert streaming["kv_cache_final_bytes"] <= per_token * (2 + 40)
    assert streaming["kv_cache_peak_bytes"] <= per_token * (2 + 40 + 32)
    manifest = (out / "manifest.json").read_text()
    assert '"streaming_llm.window": 40' in manifest and '"policy": {' in manifest


def test_longppl_reads_a_document_under_each_method(model_dirs, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("\n".join(" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(12)) for i in range(40)))
    out = tmp_path / "ppl"
    code = cli.main(["run", "--suite", "longppl", "--data", str(text), "--target", model_dirs[0], "--methods",
                     "ar,streaming_llm", "--option", "length=300", "--option", "chunk=16", "--option", "window=64",
                     "--option", "stride=32", "--set", "streaming_llm.window=48", "--no-warmup", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    found = records(out)
    ar, streaming = found[("ar", "doc-0")], found[("streaming_llm", "doc-0")]
    for r in (ar, streaming):
        assert len(r["token_nll"]) == r["scored_tokens"] == r["prompt_tokens"] - 1
        total = sum(r["token_nll"])
        assert r["word_perplexity"] == pytest.approx(math.exp(total / r["words"]))
        assert r["bits_per_byte"] == pytest.approx(total / (r["bytes"] * math.log(2)))
    assert ar["task_metric"] == "sliding 64/32" and ar["kv_cache_peak_bytes"] is None  # no cache kept
    assert streaming["task_metric"] == "cached, chunks of 16"
    assert streaming["kv_cache_peak_bytes"] <= 2 * 2 * 2 * 16 * 4 * (4 + 48 + 16)
    # the first pass scores tokens 1..64 (it reads 0..63), each later one the next 32
    assert ar["target_calls"] == math.ceil((ar["prompt_tokens"] - 65) / 32) + 1
    assert ar["window_tokens"] == [64] + [32] * (ar["target_calls"] - 2) + [ar["prompt_tokens"] - 65 - 32 * (ar["target_calls"] - 2)]
    assert sum(ar["window_loglik"]) == pytest.approx(-sum(ar["token_nll"]))
    assert len(streaming["window_tokens"]) == streaming["target_calls"] and sum(streaming["window_tokens"]) == len(streaming["token_nll"])


def test_likelihood_suite_refuses_decoders_that_do_not_change_likelihoods(model_dirs, tmp_path, capsys):
    code = cli.main(["run", "--suite", "longppl", "--target", model_dirs[0], "--draft", model_dirs[1],
                     "--methods", "ar,sps", "--out", str(tmp_path / "x")])
    assert code == 2 and "sps would give ar's figures" in capsys.readouterr().out


def test_sliding_and_cached_reading_agree_with_one_pass():
    model = tiny_llama()
    ids = [4 + (5 * i) % 50 for i in range(120)]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    exact = [-logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert likelihood.cached_nll(model, ids, chunk=7) == pytest.approx(exact, abs=1e-4)
    assert likelihood.sliding_nll(model, ids, window=len(ids), stride=8) == pytest.approx(exact, abs=1e-4)
    # disjoint windows: the first pass reads ids 0..29 and scores 1..30; the second reads 30..59 and scores
    # 31..60, the first of them after one token of context
    disjoint = likelihood.read_sliding(model, ids, window=30, stride=30)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids[30:32]])).logits[0].float(), -1)
    assert len(disjoint.nll) == len(ids) - 1 and disjoint.windows == [30, 30, 30, 29]
    assert disjoint.nll[:30] == pytest.approx(exact[:30], abs=1e-4)
    assert disjoint.nll[30] == pytest.approx(-logp[0, ids[31]].item(), abs=1e-4)
