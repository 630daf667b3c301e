"""The report's long-context sections on small synthetic record sets, every figure hand-computed: RULER accuracy
by length and depth, the KV cache's bytes, latency against context length, perplexity against position; and
which sections a run of each kind shows."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from harness import longtables
from harness.report import build_report, format_table_markdown
from harness.tables import load_records, normalized, speed_table

MIB = 2**20


def _longctx(method, task, length, depth, score, sample=0, **extra):
    where = f"d{depth:g}-" if depth is not None else ""
    record = {
        "schema_version": 3, "method": method, "suite": "longctx", "category": task,
        "item_id": f"{task}-{length}-{where}s{sample}", "item_turns": 1, "decoder": "ar",
        "policy": None if method == "ar" else method, "temperature": 0.0, "prompt_tokens": length + 2,
        "item_meta": {"task": task, "length": length, "depth": depth, "tokens": length + 2, "sample": sample},
        "new_tokens": 5, "wall_s": 1.0, "prefill_s": 0.6, "decode_s": 0.4, "tokens_per_s": 5.0,
        "target_pass_s": [0.6, 0.1, 0.1, 0.1, 0.1], "target_widths": [length + 2, 1, 1, 1, 1], "target_calls": 5, "target_tokens": length + 6,
        "draft_calls": 0, "accept_lengths": [1] * 5, "proposed_lengths": [0] * 5, "peak_mem_bytes": 100 * MIB,
        "kv_cache_peak_bytes": MIB, "kv_cache_final_bytes": MIB, "task_score": score,
        "task_metric": "string_match_all", "output_text": "x", "output_ids": [1] * 5, "stop_reason": "max_new_tokens",
    }
    record.update(extra)
    return record


# niah_single, ar: length 100 depths 0/100 -> 1, 0.5; length 200 depth 0 twice (samples) -> 0 and 1 = 0.5
LONGCTX = [
    _longctx("ar", "niah_single", 100, 0.0, 1.0),
    _longctx("ar", "niah_single", 100, 100.0, 0.5),
    _longctx("ar", "niah_single", 200, 0.0, 0.0),
    _longctx("ar", "niah_single", 200, 0.0, 1.0, sample=1),
    _longctx("ar", "vt", 100, None, 1.0, kv_cache_peak_bytes=3 * MIB, kv_cache_final_bytes=3 * MIB),
    # decode_s missing: the passes after the first give the step time, (0.2 + 0.4) / (3 - 1)
    _longctx("ar", "vt", 200, None, 0.0, decode_s=None, new_tokens=3, target_pass_s=[0.5, 0.2, 0.4],
             target_widths=[202, 1, 1]),
    _longctx("streaming_llm", "niah_single", 100, 0.0, 0.0, kv_cache_peak_bytes=MIB // 2,
             kv_cache_final_bytes=MIB // 4, policy_state_bytes=MIB // 8),
    # the prompt read in two chunks: prefill 1.0 + 0.4 s; decoding (0.8 - 0.4) s over 4 - 1 tokens
    _longctx("streaming_llm", "niah_single", 200, 0.0, 0.0, kv_cache_peak_bytes=MIB // 2,
             kv_cache_final_bytes=MIB // 4, decode_s=0.8, prefill_s=1.0, new_tokens=4,
             target_widths=[128, 74, 1, 1, 1], target_pass_s=[1.0, 0.4, 0.1, 0.1, 0.1]),
    _longctx("streaming_llm", "vt", 100, None, 1.0, error="boom", task_score=None),
]


def _longppl(method, item_id, nll, words, size, wall, how, kv=None):
    return {"schema_version": 3, "method": method, "suite": "longppl", "category": "document", "item_id": item_id,
            "item_turns": 1, "decoder": "ar", "policy": None if method == "ar" else method,
            "prompt_tokens": len(nll) + 1, "token_nll": nll, "scored_tokens": len(nll), "words": words,
            "bytes": size, "wall_s": wall, "tokens_per_s": (len(nll) + 1) / wall, "target_calls": 2,
            "target_tokens": len(nll) + 1, "task_metric": how, "kv_cache_peak_bytes": kv,
            "kv_cache_final_bytes": kv, "token_perplexity": math.exp(sum(nll) / len(nll))}


# Window 3 (config.json below): NLL entries 0-1 are positions 1-2 (inside), entries 2+ positions 3+ (past).
#   streaming_llm: total 8 + 4 = 12 over 6 tokens, 4 words, 24 bytes; inside [1, 1, 3, 1], past [2, 4]
LONGPPL = [
    _longppl("ar", "doc-0", [1.0, 1.0, 1.0, 1.0], 2, 10, 0.4, "sliding 3/1"),
    _longppl("streaming_llm", "doc-0", [1.0, 1.0, 2.0, 4.0], 3, 12, 0.5, "cached, chunks of 2", kv=MIB),
    _longppl("streaming_llm", "doc-1", [3.0, 1.0], 1, 12, 0.1, "cached, chunks of 2", kv=MIB),
]


def _manifest(suite, source=None, **extra):
    methods = {"ar": {"paper": "autoregressive", "lossless": True, "config": {}},
               "streaming_llm": {"paper": "autoregressive", "lossless": False, "config": {}, "decoder": "ar",
                                 "policy": {"name": "streaming_llm", "paper": "Attention Sinks", "arxiv": "2309.17453",
                                            "config": {"sinks": 4, "window": 48}}}}
    return {"schema_version": 3, "name": f"{suite}-run", "suite": suite, "methods": methods,
            "target": {"spec": "tiny", "source": str(source) if source else None}, **extra}


def _run(tmp_path, records, manifest):
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    folder = build_report(tmp_path)
    return folder, (folder / "report.md").read_text(), (folder / "report.html").read_text()


def _section(markdown, title):
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _ok(records):
    frame = normalized(pd.DataFrame(records))
    return frame[frame["error"].isna()]


def test_accuracy_tables_and_needle_grid():
    ok = _ok(LONGCTX)
    grids = longtables.needle_grid(ok, ["ar", "streaming_llm"])
    assert grids["ar"].loc[100, 0.0] == 1.0 and grids["ar"].loc[100, 100.0] == 0.5
    assert grids["ar"].loc[200, 0.0] == 0.5 and math.isnan(grids["ar"].loc[200, 100.0])
    assert grids["streaming_llm"].to_numpy().tolist() == [[0.0], [0.0]]
    tasks = longtables.accuracy_by_task(ok, ["ar", "streaming_llm"])
    assert list(tasks) == ["niah_single", "vt"]
    assert tasks["niah_single"].loc["ar"].tolist() == [(0.75, 2), (0.5, 2), (0.625, 4)]
    assert tasks["vt"].index.tolist() == ["ar"]  # streaming_llm's only vt record failed
    assert tasks["vt"].loc["ar"].tolist() == [(1.0, 1), (0.0, 1), (0.5, 2)]


def test_kv_and_latency_tables():
    ok = _ok(LONGCTX)
    kv = longtables.kv_cache_table(ok, ["ar", "streaming_llm"])
    assert kv.loc["ar", ["peak mean", "peak max"]].tolist() == [(5 * MIB + 3 * MIB) / 6, 3 * MIB]
    assert kv.loc["streaming_llm", ["peak max", "final mean", "process peak"]].tolist() == [MIB / 2, MIB / 4, 100 * MIB]
    latency = longtables.latency_by_length(ok, ["ar", "streaming_llm"])
    assert list(zip(latency["method"], latency["length"])) == [("ar", 100), ("ar", 200), ("streaming_llm", 100),
                                                               ("streaming_llm", 200)]
    rows = latency.set_index(["method", "length"])
    assert rows.loc[("ar", 100), "records"] == 3 and rows.loc[("ar", 100), "decode step s"] == pytest.approx(0.1)
    assert rows.loc[("ar", 200), "decode step s"] == pytest.approx((0.1 + 0.1 + 0.3) / 3)  # vt: 0.6 / 2 steps
    assert rows.loc[("streaming_llm", 200), ["prefill s", "decode step s"]].tolist() == pytest.approx([1.4, 0.4 / 3])
    assert rows.loc[("ar", 200), "prompt tokens"] == 202
    record = {"prompt_tokens": 10, "target_widths": [6, 4, 1]}
    assert longtables.prefill_passes(record) == 2
    assert longtables.prefill_passes({**record, "target_widths": [3, 1]}) == 1  # never adds up: the first only
    assert longtables.prefill_passes({**record, "target_widths": None}) == 1


def test_longctx_report_shows_accuracy_kv_and_latency(tmp_path):
    folder, markdown, html = _run(tmp_path, LONGCTX, _manifest("longctx"))
    accuracy = _section(markdown, "Long-context accuracy")
    assert "![Needle retrieval by length and depth](needle_heatmap.png)" in accuracy
    assert "| Method | 100 tokens | 200 tokens | all lengths |" in accuracy
    assert "| ar | 0.75 (2) | 0.50 (2) | 0.62 (4) |" in accuracy  # 0.625 rounds to even
    assert "| streaming_llm | 0.00 (1) | 0.00 (1) | 0.00 (2) |" in accuracy
    kv = _section(markdown, "KV-cache memory")
    assert "| ar | 6/6 | 1.33 | 3.00 | 1.33 | 3.00 | n/a | 100 |" in kv
    assert "| streaming_llm | 2/2 | 0.500 | 0.500 | 0.250 | 0.250 | 0.125 | 100 |" in kv
    latency = _section(markdown, "Latency against context length")
    assert "| ar | 100 | 3 | 102 | 0.600 | 100.00 |" in latency
    assert "| ar | 200 | 3 | 202 | 0.600 | 166.67 |" in latency
    assert "| streaming_llm | 200 | 1 | 202 | 1.400 | 133.33 |" in latency
    assert "## Spec-Bench table" in markdown and "niah_single" in _section(markdown, "Spec-Bench table")
    assert "## Perplexity against position" not in markdown
    assert "Attention Sinks (policy), under ar" in _section(markdown, "Methods")
    for name in ("needle_heatmap.png", "latency_by_length.png"):
        assert (folder / name).stat().st_size > 0
    assert html.count("data:image/png;base64,") >= 2 and "<h2>Long-context accuracy</h2>" in html


def test_running_perplexity_and_position_means():
    positions, ppl = longtables.running_perplexity(np.array([1.0, 2.0, 3.0, 4.0]), 2)
    assert positions.tolist() == [2, 3, 4] and ppl == pytest.approx(np.exp([1.5, 2.5, 3.5]))
    assert longtables.running_perplexity(np.array([1.0]), 2)[0].size == 0
    assert longtables.mean_nll_by_position([[1.0, 1.0, 2.0, 4.0], [3.0, 1.0]]).tolist() == [2.0, 1.0, 2.0, 4.0]
    assert longtables.running_window(10_000) == 256 and longtables.running_window(600) == 60


def test_perplexity_table_pools_documents():
    table = longtables.perplexity_table(_ok(LONGPPL), ["ar", "streaming_llm"], window=3)
    row = table.loc["streaming_llm"]
    assert row["documents"] == 2 and row["scored tokens"] == 6 and row["words"] == 4 and row["bytes"] == 24
    assert row["token ppl"] == pytest.approx(math.exp(2)) and row["word ppl"] == pytest.approx(math.exp(3))
    assert row["byte ppl"] == pytest.approx(math.exp(0.5))
    assert row["bits per byte"] == pytest.approx(0.5 / math.log(2))
    assert row["ppl inside window"] == pytest.approx(math.exp(1.5)) and row["ppl past window"] == pytest.approx(math.exp(3))
    assert row["ms per token"] == pytest.approx(1000 * 0.6 / 8)
    assert math.isnan(longtables.perplexity_table(_ok(LONGPPL), ["ar"], None).loc["ar", "ppl past window"])


def test_model_window_sources(tmp_path):
    reading = _ok(LONGPPL)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 3}))
    assert longtables.model_window(_manifest("longppl", tmp_path), reading) == (3, f"max_position_embeddings in {tmp_path / 'config.json'}")
    gone = _manifest("longppl", tmp_path / "gone")
    assert longtables.model_window({**gone, "target": {"spec": "smollm2-135m"}}, reading)[0] == 8192
    assert longtables.model_window(gone, reading)[0] == 3  # ar read "sliding 3/1" with the window option at 0
    chosen = {**gone, "settings": {"suite_options": {"window": "3"}}}  # the user's window is not the model's
    assert longtables.model_window(chosen, reading) == (None, "unknown (the target's config is not reachable)")


def test_likelihood_report_has_its_own_sections_and_no_spec_bench(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 3}))
    run = tmp_path / "run"
    run.mkdir()
    failed = {**_longppl("streaming_llm", "doc-2", [1.0], 1, 1, 1.0, "x"), "token_nll": None, "error": "boom"}
    folder, markdown, html = _run(run, [*LONGPPL, failed], _manifest("longppl", model))
    for absent in ("Spec-Bench table", "Cost per method", "Lossless check", "Plots", "Output quality",
                   "Long-context accuracy", "Latency against context length"):
        assert f"## {absent}\n" not in markdown, absent
    ppl = _section(markdown, "Perplexity against position")
    assert ("| streaming_llm | tiny | 2 | 6 | 4 | 24 | 7.39 | 20.09 | +171.83% | 1.6487 | 0.7213 | 4.48 | 20.09 | cached, chunks of 2 | 75.000 |"
            in ppl)
    assert "| ar | tiny | 1 | 4 | 2 | 10 | 2.72 | 7.39 | +0.00% | 1.4918 | 0.5771 | 2.72 | 2.72 | sliding 3/1 | 80.000 |" in ppl
    assert "model's trained window (3)" in ppl and "![Perplexity against position](perplexity_by_position.png)" in ppl
    kv = _section(markdown, "KV-cache memory")
    assert "| ar | 0/1 | n/a |" in kv and "| streaming_llm | 2/2 | 1.00 | 1.00 |" in kv
    assert "boom" in _section(markdown, "Errors")
    assert "Max new tokens" not in _section(markdown, "Run") and "Sampling" not in _section(markdown, "Run")
    assert (folder / "perplexity_by_position.png").stat().st_size > 0
    assert not (folder / "tokens_per_s.png").exists() and "<h2>Spec-Bench table</h2>" not in html
    table = speed_table(load_records(run / "results.jsonl"))
    assert table.empty and "no generated text" in format_table_markdown(table)


def test_spec_bench_run_shows_no_long_context_sections(tmp_path):
    records = [{**r, "suite": "specbench", "item_meta": None, "kv_cache_peak_bytes": None,
                "kv_cache_final_bytes": None, "task_score": None, "task_metric": None} for r in LONGCTX[:2]]
    _, markdown, _ = _run(tmp_path, records, _manifest("specbench"))
    for absent in ("Long-context accuracy", "Perplexity against position", "Latency against context length",
                   "KV-cache memory"):
        assert f"## {absent}\n" not in markdown, absent
    assert "## Spec-Bench table" in markdown and "## Cost per method" in markdown


def test_perplexity_plot_with_the_window_inside_or_past_the_document(tmp_path):
    from harness.plots import plot_perplexity_by_position

    curve = longtables.running_perplexity(np.linspace(1.0, 3.0, 50), 5)
    for window in (20, 10_000, None):
        path = tmp_path / f"ppl-{window}.png"
        assert plot_perplexity_by_position({"ar": curve}, window, 5, path) == path and path.stat().st_size > 0
    assert plot_perplexity_by_position({"ar": (np.array([]), np.array([]))}, 20, 5, tmp_path / "none.png") is None


def test_latency_split_takes_a_counted_chunked_prefill_as_recorded():
    # schema 3: the runner timed the prefill to the end of its second chunk (1.0 + 0.4 s) and decoding after it
    record = pd.Series({"prefill_calls": 2, "prefill_s": 1.4, "decode_s": 0.3, "new_tokens": 4, "prompt_tokens": 200,
                        "target_widths": [128, 72, 1, 1, 1], "target_pass_s": [1.0, 0.4, 0.1, 0.1, 0.1]})
    assert longtables.split_latency(record) == (1.4, pytest.approx(0.1))
    # schema 2: prefill_s ended with the first pass; the second chunk moves from decoding to prefill
    old = record.drop("prefill_calls").copy()
    old["prefill_s"], old["decode_s"] = 1.0, 0.7
    assert longtables.split_latency(old) == (pytest.approx(1.4), pytest.approx(0.1))
