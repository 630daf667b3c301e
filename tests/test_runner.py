"""The runner end to end on tiny local model folders: counts, budgets, lossless checks, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import cli
from harness.instrument import Budget
from harness.record import SCHEMA_VERSION
from harness.results import read_records
from harness.runfolder import RunFolderError
from harness.runner import RunConfig, Runner
from methods import base as method_base
from methods.base import Method

QUESTIONS = [
    {"question_id": "chat-1", "category": "roleplay", "turns": ["hello world", "the robot paints"]},  # MT-bench's
    {"question_id": "qa-1", "category": "qa", "turns": ["the cat reads"], "reference": ["yes"]},
    {"question_id": "qa-2", "category": "qa", "turns": ["one plus two equals"], "reference": ["three"]},
    {"question_id": "x-1", "category": "poetry", "turns": ["red blue green house"]},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return str(path)


def config(model_dirs, data_file, out, **kw):
    defaults = dict(methods=["ar", "sps", "pld", "hf_generate", "hf_assisted"], target=model_dirs[0],
                    draft=model_dirs[1], data=data_file, max_new_tokens=12, out=str(out), warmup=False,
                    strict_counting=True)  # a method's uncounted model work fails its record
    return RunConfig(**{**defaults, **kw})


def run(cfg) -> list[dict]:
    Runner(cfg).run()
    return read_records(Path(cfg.out) / "results.jsonl")


def test_full_run_counts_and_lossless_checks(model_dirs, data_file, tmp_path, cache_dir):
    records = run(config(model_dirs, data_file, tmp_path / "run"))
    assert len(records) == 5 * 5  # 5 methods x (1 two-turn item + 3 one-turn items)
    assert not [r for r in records if r["error"]]
    assert {r["category"] for r in records} == {"mt_bench", "qa", "poetry"}  # unknown category kept
    assert {r["subcategory"] for r in records if r["category"] == "mt_bench"} == {"roleplay"}
    assert {r["schema_version"] for r in records} == {SCHEMA_VERSION}
    assert {(r["item_id"], r["item_turns"]) for r in records} == {("chat-1", 2), ("qa-1", 1), ("qa-2", 1), ("x-1", 1)}
    by_method = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
        assert r["trace_error"] is None
        assert r["target_tokens"] == sum(r["target_widths"]) and len(r["target_widths"]) == r["target_calls"]
        assert len(r["target_pass_s"]) == r["target_calls"] and len(r["draft_pass_s"]) == r["draft_calls"]
        assert 0 < sum(r["target_pass_s"]) + sum(r["draft_pass_s"]) <= r["wall_s"]
        assert abs(r["prefill_s"] + r["decode_s"] - r["wall_s"]) < 1e-9
        if r["method"] in ("ar", "hf_generate"):  # a separate prefill pass; the others fold it into verification
            assert r["target_widths"][0] == r["prompt_tokens"]
        if r["method"] in ("ar", "hf_generate"):
            assert r["target_calls"] == r["new_tokens"]
            assert r["target_tokens"] == r["prompt_tokens"] + r["new_tokens"] - 1
        if r["method"] in ("sps", "pld"):
            first, *later = r["proposed_lengths"]
            assert r["target_widths"] == [r["prompt_tokens"] + first] + [1 + k for k in later]
        if r["method"] != "ar":
            assert r["lossless_check"]["equal"], r
    for r in by_method["sps"]:
        assert r["draft_calls"] > 0 and r["draft_tokens"] >= r["prompt_tokens"]
    ar_out = {(r["item_id"], r["turn"]): r["output_ids"] for r in by_method["ar"]}
    for name in ("sps", "pld", "hf_generate", "hf_assisted"):
        assert {(r["item_id"], r["turn"]): r["output_ids"] for r in by_method[name]} == ar_out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["methods"]["hf_assisted"]["reference"] is True
    assert manifest["target"]["kind"] == "folder" and manifest["versions"]["torch"]
    roof = manifest["roofline"]  # measured at the start of the run, for the report's roofline section
    assert roof["device"]["read_bandwidth_bytes_s"] > 0 and roof["target"]["weight_bytes_per_token"] > 0
    assert roof["draft"]["weight_bytes_per_token"] > 0


def test_budgets_stop_at_exactly_the_budget(model_dirs, data_file, tmp_path, cache_dir):
    calls = run(config(model_dirs, data_file, tmp_path / "calls", methods=["ar", "sps"],
                       budgets=[Budget(max_target_calls=3)], max_new_tokens=50))
    assert sum(r["stop_reason"] == "budget" for r in calls) >= 4
    for r in calls:
        assert r["target_calls"] <= 3
        if r["method"] == "ar" and r["stop_reason"] != "eos":
            assert r["target_calls"] == 3 and r["new_tokens"] == 3 and r["stop_reason"] == "budget"
    tokens = run(config(model_dirs, data_file, tmp_path / "tokens", methods=["ar"],
                        budgets=[Budget(max_target_tokens=20)], max_new_tokens=50))
    assert sum(r["stop_reason"] == "budget" for r in tokens) >= 2
    for r in tokens:
        assert r["target_tokens"] <= 20
        if r["stop_reason"] != "eos":
            assert r["stop_reason"] == "budget" and r["new_tokens"] == max(0, 20 - r["prompt_tokens"] + 1)


def test_interrupted_run_resumes_without_loss_or_duplicates(model_dirs, data_file, tmp_path, cache_dir, monkeypatch):
    cfg = config(model_dirs, data_file, tmp_path / "resume", methods=["ar", "pld"])
    real_record = Runner._record
    calls = {"n": 0}

    def interrupt_after_four(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_record(self, *args)

    monkeypatch.setattr(Runner, "_record", interrupt_after_four)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg).run()
    results = tmp_path / "resume" / "results.jsonl"
    before = results.read_text()
    assert len(before.splitlines()) == 4
    with open(results, "a") as f:
        f.write('{"method": "ar", "item_')  # a record cut off mid-write
    monkeypatch.setattr(Runner, "_record", real_record)
    Runner(cfg).run()
    after = results.read_text()
    assert after.startswith(before)  # finished records untouched
    keys = [(r["method"], r["item_id"], r["turn"]) for r in read_records(results)]
    assert len(keys) == len(set(keys)) == 2 * 5
    Runner(cfg).run()  # a third run finds nothing to do
    assert results.read_text() == after


@pytest.fixture
def flaky_method():
    @method_base.register("flaky_test_method")
    class Flaky(Method):
        lossless = False
        fail = True

        def generate(self, ctx):
            if Flaky.fail and ctx.prompt_ids and len(ctx.prompt_ids) < 7:
                raise RuntimeError("simulated failure")
            ctx.emit([4])
            return ctx.output

    yield Flaky
    method_base._REGISTRY.pop("flaky_test_method")


def test_failing_items_are_recorded_and_retried(model_dirs, data_file, tmp_path, cache_dir, flaky_method):
    cfg = config(model_dirs, data_file, tmp_path / "flaky", methods=["flaky_test_method"])
    records = run(cfg)
    failed = [r for r in records if r["error"]]
    assert failed and all("simulated failure" in r["error"] or "earlier turn" in r["error"] for r in failed)
    assert len(records) == 5  # the run went on past the failures
    flaky_method.fail = False
    records = run(cfg)
    assert len(records) == 5 and not [r for r in records if r["error"]]


def test_changed_settings_refuse_to_mix_into_a_run(model_dirs, data_file, tmp_path, cache_dir):
    run(config(model_dirs, data_file, tmp_path / "mix", methods=["ar"], limit=1))
    with pytest.raises(RunFolderError, match="max_new_tokens"):
        Runner(config(model_dirs, data_file, tmp_path / "mix", methods=["pld"], limit=1, max_new_tokens=5)).run()


def test_unknown_method_and_bad_setting_fail_before_loading(model_dirs, data_file, tmp_path):
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        Runner(config(model_dirs, data_file, tmp_path / "x", methods=["nope"]))
    with pytest.raises(ValueError, match="has no setting delta"):
        Runner(config(model_dirs, data_file, tmp_path / "x", methods=["sps"], settings={"sps": {"delta": "1"}}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_run_counts_memory_and_lossless(model_dirs, data_file, tmp_path, cache_dir, dtype):
    records = run(config(model_dirs, data_file, tmp_path / dtype, device="cuda", dtype=dtype))
    assert not [r["error"] for r in records if r["error"]]
    for r in records:
        assert r["peak_mem_bytes"] > 0 and r["prefill_s"] > 0 and r["trace_error"] is None
        check = r["lossless_check"]
        if check:  # a divergence is allowed only where the target's top-2 logits tie numerically
            assert check["equal"] or check["numerical_tie"], r
    manifest = json.loads((tmp_path / dtype / "manifest.json").read_text())
    assert "cuda" in manifest["device"] and manifest["target"]["dtype"] == dtype


def test_reproduce_detects_a_changed_output(model_dirs, data_file, tmp_path, cache_dir):
    from harness.reproduce import compare_runs, config_from_manifest

    first = tmp_path / "first"
    run(config(model_dirs, data_file, first, methods=["ar", "sps"], settings={"sps": {"gamma": 3}}))
    manifest = json.loads((first / "manifest.json").read_text())
    again = config_from_manifest(manifest, str(tmp_path / "again"))
    assert again.settings["sps"]["gamma"] == 3 and again.methods == ["ar", "sps"]
    run(again)
    same = compare_runs(first, tmp_path / "again")
    assert same.identical_outputs and not same.count_diffs and len(same.speed) == 2

    records = read_records(first / "results.jsonl")
    victim = next(r for r in records if len(r["output_ids"]) > 2)
    victim["output_ids"][2] += 1
    (first / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    changed = compare_runs(first, tmp_path / "again")
    assert not changed.identical_outputs
    assert changed.output_diffs[0]["position"] == 2


def test_repeats_run_every_record_and_report_the_spread(model_dirs, data_file, tmp_path, cache_dir):
    from harness.report import build_report
    from harness.tables import load_records, repeat_spread

    out = tmp_path / "repeats"
    records = run(config(model_dirs, data_file, out, methods=["ar", "pld"], repeats=3, limit=1))
    keys = {(r["method"], r["item_id"], r["turn"], r["repeat"]) for r in records}
    assert len(keys) == len(records) == 2 * 4 * 3  # methods x (item turns: 2 + 1 + 1) x repeats
    for r in records:  # greedy: every repeat emits the same tokens, checked against ar's same repeat
        if r["method"] == "pld":
            assert r["lossless_check"]["equal"]
    spread = repeat_spread(load_records(out / "results.jsonl"))
    assert list(spread["repeats"]) == [3, 3]
    assert "Timing spread over repeats" in (build_report(out) / "report.md").read_text()


def test_budget_sweep_runs_every_point_and_reports_it(model_dirs, data_file, tmp_path, cache_dir):
    from harness.report import build_report
    from harness.tables import budget_sweep, load_records

    out = tmp_path / "sweep"
    points = [Budget(max_target_calls=n) for n in (2, 4, 8)]
    records = run(config(model_dirs, data_file, out, methods=["ar", "pld"], budgets=points, limit=1, max_new_tokens=30))
    assert len(records) == 2 * 4 * 3  # methods x item turns x sweep points
    for r in records:
        assert r["target_calls"] <= r["max_target_calls"]
        if r["method"] == "ar" and r["stop_reason"] == "budget":
            assert r["new_tokens"] == r["max_target_calls"]
        if r["method"] == "pld":  # checked against ar at the same budget
            assert r["lossless_check"]["equal"]
    sweep = budget_sweep(load_records(out / "results.jsonl"))
    ar = sweep[sweep["method"] == "ar"].sort_values("budget")
    assert list(ar["budget"]) == [2, 4, 8] and list(ar["new tokens"]) == sorted(ar["new tokens"])
    assert ar["output perplexity"].notna().all()  # quality against budget, computed by the harness
    report = build_report(out)
    assert (report / "budget_sweep.png").is_file()
    assert "target_calls=8 point" in (report / "report.md").read_text()


def test_report_sets_predicted_beside_measured_speedup(model_dirs, data_file, tmp_path, cache_dir, pair):
    from harness.costmodel import measure, save_profile
    from harness.report import build_report

    out = tmp_path / "predicted"
    records = run(config(model_dirs, data_file, out, methods=["ar", "sps"], limit=1))
    assert all(len(r["draft_widths"]) == r["draft_calls"] for r in records)
    tables = {role: measure(model, widths=(1, 4, 8), contexts=(8, 32), repeats=1) for role, model in zip(("target", "draft"), pair)}
    save_profile(out / "profile.json", "test device", tables, {"target": "tiny", "draft": "tiny"})
    text = (build_report(out) / "report.md").read_text()
    section = text.split("## Predicted speed-ups (cost model)")[1].split("## ")[0]
    assert "| Method | Measured here | Predicted on test device |" in section and "| sps |" in section
    # a second device whose draft passes cost nearly nothing: one more column, a larger predicted sps speed-up
    cheap = {"target": tables["target"], "draft": type(tables["draft"])(
        widths=tables["draft"].widths, contexts=tables["draft"].contexts,
        seconds=[[s / 1000 for s in row] for row in tables["draft"].seconds])}
    save_profile(tmp_path / "cheap.json", "cheap-draft device", cheap, {"target": "tiny", "draft": "tiny"})
    assert cli.main(["report", str(out), "--profile", str(out / "profile.json"), "--profile",
                     str(tmp_path / "cheap.json")]) == 0
    section = (out / "report" / "report.md").read_text().split("## Predicted speed-ups (cost model)")[1].split("## ")[0]
    header = "| Method | Measured here | Predicted on test device | Predicted on cheap-draft device |"
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in section.splitlines()
            if line.startswith(("| ar", "| sps"))}
    assert header in section and rows["ar"][1:] == ["1.00x", "1.00x |"]
    assert float(rows["sps"][2].strip(" x|")) > float(rows["sps"][1].strip(" x|"))
    assert cli.main(["report", str(out), "--profile", str(tmp_path / "missing.json")]) == 2


@pytest.fixture
def stateful_method():
    @method_base.register("stateful_test_method")
    class Stateful(Method):
        lossless = False

        def generate(self, ctx):
            ctx.state["table"] = torch.zeros(1000, 8, dtype=torch.int32)  # 32,000 bytes the harness must see
            ctx.extras["my_figure"] = 0.5
            ctx.emit([4])
            return ctx.output

    yield Stateful
    method_base._REGISTRY.pop("stateful_test_method")


def test_method_state_is_measured_by_the_harness_and_self_drafts_count_as_draft(
        model_dirs, data_file, tmp_path, cache_dir, stateful_method):
    from harness.report import build_report

    out = tmp_path / "state"
    # not strict: on this 2-layer model layer_skip's skip set is empty (first and last layers always run),
    # so its self-draft passes skip nothing; both are counted in the record instead
    records = run(config(model_dirs, data_file, out, methods=["ar", "layer_skip", "superposed", "stateful_test_method"],
                         limit=1, strict_counting=False))
    by_method = {r["method"]: r for r in records if r["turn"] == 0 and r["item_id"] == "chat-1"}
    assert by_method["stateful_test_method"]["method_state_bytes"] >= 32_000
    assert by_method["stateful_test_method"]["extras"] == {"my_figure": 0.5}
    assert by_method["ar"]["method_state_bytes"] == 0 and by_method["ar"]["self_draft_calls"] == 0
    skip = by_method["layer_skip"]
    assert skip["trace_error"] is None and skip["lossless_check"]["equal"]
    assert skip["self_draft_calls"] == skip["draft_calls"] > 0 and len(skip["draft_widths"]) == skip["draft_calls"]
    assert skip["target_calls"] == len(skip["accept_lengths"])
    assert len(skip["self_draft_bytes"]) == skip["self_draft_calls"]
    assert all(0 < b <= skip["target_pass_bytes"] for b in skip["self_draft_bytes"])
    superposed = by_method["superposed"]  # lossy: its k drafts and the output's perplexity are recorded
    assert superposed["trace_error"] is None and superposed["lossless_check"] is None
    assert len(superposed["alternatives_text"]) == 3 and superposed["output_text"] == superposed["alternatives_text"][0]
    assert superposed["output_perplexity"] > 1 and by_method["ar"]["output_perplexity"] > 1
    assert superposed["method_state_bytes"] > 0 and skip["output_perplexity"] > 1
    text = (build_report(out) / "report.md").read_text()
    assert "Method state (MiB)" in text and "Output perplexity" in text
    host = text.split("## Host overhead")[1].split("## ")[0]  # from the per-pass times every record carries
    assert all(f"| {name} |" in host for name in ("ar", "layer_skip", "superposed"))
    assert "| stateful_test_method |" not in host  # it ran no forward pass: no time per pass to speak of
    section = text.split("## Multiple outputs")[1].split("## ")[0]
    assert "| superposed |" in section and "| 3 |" in section
