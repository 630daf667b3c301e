"""Quality metrics: output perplexity under the target, task scores per category, and the report's quality section."""
from __future__ import annotations

import json
import math

import pytest
import torch

from harness import quality
from harness.report import build_report
from harness.tables import quality_table
from methods.base import DecodeContext, Sampling, get_method


def test_perplexity_equals_token_by_token_computation(pair):
    target, _ = pair
    prompt, output = [4, 6, 9, 7], [10, 11, 12, 1]
    nll = 0.0
    for i, token in enumerate(output):
        with torch.inference_mode():
            logits = target(torch.tensor([prompt + output[:i]])).logits[0, -1]
        nll -= float(torch.log_softmax(logits.float(), -1)[token])
    assert quality.output_perplexity(target, prompt, output) == pytest.approx(math.exp(nll / len(output)), rel=1e-5)
    assert quality.output_perplexity(target, prompt, []) is None


def test_greedy_output_has_lower_perplexity_than_a_random_one(pair):
    target, _ = pair
    ctx = DecodeContext(prompt_ids=[4, 6, 9, 7], target=target, sampling=Sampling(), max_new_tokens=12,
                        eos_token_ids=frozenset())
    greedy = get_method("ar")().generate(ctx)
    shuffled = list(reversed(greedy))
    assert quality.output_perplexity(target, [4, 6, 9, 7], greedy) < quality.output_perplexity(target, [4, 6, 9, 7], shuffled)


def test_final_number_exact_match():
    assert quality.number_exact_match("12 x 18 = 216, minus 150 leaves **66** cookies.", "66") == 1.0
    assert quality.number_exact_match("He pays $1,250.00 in total", "1250") == 1.0
    assert quality.number_exact_match("The answer is 66, not 65", "66") == 0.0  # the LAST number counts
    assert quality.number_exact_match("no idea", "66") == 0.0
    with pytest.raises(ValueError, match="no number"):
        quality.number_exact_match("66", "sixty-six")


def test_token_f1_follows_squad_normalisation():
    assert quality.token_f1("The Pacific Ocean.", "Pacific ocean") == 1.0
    assert quality.token_f1("Paris", "Tokyo") == 0.0
    # prediction "capital is tokyo" vs "tokyo": precision 1/3, recall 1 -> F1 0.5
    assert quality.token_f1("capital is Tokyo", "Tokyo") == pytest.approx(0.5)


def test_rouge_l_and_chrf_are_the_libraries_figures():
    assert quality.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS "the cat on mat"... of 6 and 6 tokens: rouge-score's own figure, between 0 and 1
    partial = quality.rouge_l("the cat was on a mat", "the cat sat on the mat")
    assert 0.4 < partial < 1.0
    assert quality.chrf("We visited the museum yesterday.", "We visited the museum yesterday.") == pytest.approx(1.0)
    assert quality.chrf("completely different words", "We visited the museum yesterday.") < 0.3


def test_task_score_by_category_and_turn():
    assert quality.task_score("math_reasoning", "so 35", ["35"]) == (1.0, "exact_match")
    assert quality.task_score("qa", "Jupiter", ["Saturn", "Jupiter"]) == (1.0, "token_f1")  # best reference
    assert quality.task_score("mt_bench", "anything", ["x"]) == (None, None)  # no metric for open chat
    assert quality.task_score("qa", "anything", []) == (None, None)
    assert quality.references_for_turn(("a", "b"), turns=1, turn=0) == ["a", "b"]
    assert quality.references_for_turn(("a", "b"), turns=2, turn=1) == ["b"]
    assert quality.references_for_turn(("a",), turns=2, turn=1) == []
    assert quality.references_for_turn(None, turns=1, turn=0) == []


def test_builtin_math_references_are_numbers():
    from suites.specbench import SpecBench

    for item in SpecBench().items():
        if item.category == "math_reasoning":
            assert quality.final_number(item.reference[0]) is not None, item.item_id


def _record(method, category, item, ppl, score, metric, tps, extras=None):
    return {"method": method, "suite": "s", "category": category, "item_id": item, "turn": 0, "repeat": 0,
            "new_tokens": 10, "wall_s": 10 / tps, "tokens_per_s": tps, "mean_accepted": 1.0, "target_calls": 10,
            "output_perplexity": ppl, "task_score": score, "task_metric": metric, "error": None,
            "extras": extras or {}, "output_ids": [1], "output_text": "x", "temperature": 0.0}


RECORDS = [
    _record("ar", "qa", "q1", 2.0, 1.0, "token_f1", 10.0),
    _record("ar", "qa", "q2", 4.0, 0.0, "token_f1", 10.0),
    _record("ar", "mt_bench", "m1", 6.0, None, None, 10.0),
    _record("beam", "qa", "q1", 1.5, 1.0, "token_f1", 5.0, {"distinct_2": 0.5}),
    _record("beam", "qa", "q2", 2.5, 1.0, "token_f1", 5.0, {"distinct_2": 0.7}),
    _record("beam", "mt_bench", "m1", 2.0, None, None, 5.0, {"distinct_2": 0.9}),
]


def test_quality_table_means():
    import pandas as pd

    table = quality_table(pd.DataFrame(RECORDS))
    assert list(table.index) == ["ar", "beam"]
    assert table.loc["ar", "Output PPL"] == pytest.approx(4.0)
    assert table.loc["beam", "Output PPL"] == pytest.approx(2.0)
    assert table.loc["ar", "qa (token_f1)"] == pytest.approx(0.5)
    assert table.loc["beam", "Mean task score"] == pytest.approx(1.0)
    assert table.loc["beam", "distinct_2"] == pytest.approx(0.7)
    assert math.isnan(table.loc["ar", "distinct_2"])


def test_report_has_quality_table_and_scatter(tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "manifest.json").write_text(json.dumps({"methods": {}}))
    folder = build_report(tmp_path)
    markdown = (folder / "report.md").read_text()
    html = (folder / "report.html").read_text()
    assert (folder / "quality_vs_speed.png").stat().st_size > 0
    section = markdown.split("## Output quality\n", 1)[1].split("\n## ", 1)[0]
    assert "| beam | 2.00 | 1.000 | 1.000 | 0.700 |" in section
    assert "![Quality against speed](quality_vs_speed.png)" in section
    assert "<h2>Output quality</h2>" in html and "qa (token_f1)" in html


def test_report_without_quality_figures_has_no_section(tmp_path):
    old = [{k: v for k, v in r.items() if k not in ("output_perplexity", "task_score", "task_metric", "extras")}
           for r in RECORDS]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    (tmp_path / "manifest.json").write_text(json.dumps({"methods": {}}))
    markdown = (build_report(tmp_path) / "report.md").read_text()
    assert "## Output quality" not in markdown
    assert not (tmp_path / "report" / "quality_vs_speed.png").exists()


QUESTIONS = [
    {"question_id": "qa-1", "category": "qa", "turns": ["the cat reads"], "reference": ["the robot"]},
    {"question_id": "chat-1", "category": "mt_bench", "turns": ["hello world", "the robot paints"]},
]


def test_runner_records_quality_outside_counts_and_budget(model_dirs, tmp_path, cache_dir):
    from harness.instrument import Budget
    from harness.results import read_records
    from harness.runner import RunConfig, Runner
    from methods import base as method_base
    from methods.base import Method

    @method_base.register("extras_test_method")
    class ReportsExtras(Method):
        lossless = False

        def generate(self, ctx):
            ctx.extras["figure"] = 2
            return get_method("ar")().generate(ctx)

    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    try:
        cfg = RunConfig(methods=["ar", "extras_test_method"], target=model_dirs[0], draft=None, data=str(data),
                        max_new_tokens=8, budgets=[Budget(max_target_calls=4)], out=str(tmp_path / "run"),
                        warmup=False)
        Runner(cfg).run()
    finally:
        method_base._REGISTRY.pop("extras_test_method")
    records = read_records(tmp_path / "run" / "results.jsonl")
    assert len(records) == 6 and not [r for r in records if r["error"]]
    for r in records:
        assert r["target_calls"] == 4 and r["stop_reason"] == "budget"  # the perplexity pass is not counted
        assert r["trace_error"] is None
        assert r["output_perplexity"] > 1.0
        if r["category"] == "qa":
            assert r["task_metric"] == "token_f1" and 0.0 <= r["task_score"] <= 1.0
        else:
            assert r["task_score"] is None and r["task_metric"] is None
        assert r["extras"] == ({"figure": 2.0} if r["method"] == "extras_test_method" else {})
    by_method = {r["method"]: r for r in records if r["item_id"] == "qa-1"}
    assert by_method["ar"]["output_perplexity"] == by_method["extras_test_method"]["output_perplexity"]


def test_beams_preset_and_unknown_preset():
    from harness.cli import main
    from harness.presets import get_preset
    from methods.base import registry

    assert get_preset("beams").methods == ["ar", "sps", "beam_sampling", "beam_search", "dsbd", "mjsd", "diverse_beam"]
    assert set(get_preset("beams").methods) <= set(registry())
    assert main(["run", "--preset", "nope", "--out", "/tmp/never-written"]) == 2
