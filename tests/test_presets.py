"""`decodebench run --preset`: the tree comparison end to end on the tiny models, and flag precedence."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.presets import PRESETS, get_preset, merged_settings
from harness.results import read_records
from methods.base import get_method


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"question_id": "qa-1", "category": "qa", "turns": ["the cat reads"]}) + "\n")
    return str(path)

TREE_METHODS = {"specinfer_tree", "rsd_c", "rsd_s", "dyspec", "gsd"}


def test_every_preset_names_real_methods_and_valid_settings():
    for preset in PRESETS.values():
        for name in preset.methods:
            get_method(name)(**preset.settings.get(name, {}))  # unknown knobs or bad values raise here
        assert set(preset.settings) <= set(preset.methods)


def test_explicit_settings_override_the_preset_knob_by_knob():
    preset = get_preset("trees")
    merged = merged_settings(preset, {"sps": {"gamma": "3"}, "pld": {"num_pred_tokens": "4"}})
    assert merged["sps"] == {"gamma": "3"} and merged["pld"] == {"num_pred_tokens": "4"}
    assert merged["rsd_s"] == preset.settings["rsd_s"]
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("nope")


def test_trees_preset_runs_every_tree_method_losslessly(model_dirs, data_file, tmp_path, cache_dir):
    out = tmp_path / "trees"
    code = main(["run", "--preset", "trees", "--set", "dyspec.budget=6", "--target", model_dirs[0], "--draft",
                 model_dirs[1], "--data", data_file, "--max-new-tokens", "10", "--no-warmup", "--out", str(out)])
    assert code == 0
    records = read_records(out / "results.jsonl")
    assert {r["method"] for r in records} == set(PRESETS["trees"].methods)
    for r in records:
        assert r["error"] is None and r["trace_error"] is None, r
        if r["method"] != "ar":
            assert r["lossless_check"]["equal"], r
        if r["method"] in TREE_METHODS:  # one target pass per tree: pending token(s) + every node
            first, *later = r["proposed_lengths"]
            assert r["target_widths"] == [r["prompt_tokens"] + first] + [1 + k for k in later]
            assert r["draft_calls"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"]["dyspec"]["config"] == {"budget": 6, "max_depth": 5}  # --set beat the preset
    assert manifest["methods"]["specinfer_tree"]["config"]["expansion"] == [1, 1, 3, 1, 1]  # a typed list
    report = (out / "report" / "report.md").read_text()
    assert "## Drafting" in report and "Draft tokens verified/target call" in report


def test_methods_flag_replaces_the_preset_list(model_dirs, data_file, tmp_path, cache_dir):
    out = tmp_path / "two"
    assert main(["run", "--preset", "trees-budget", "--methods", "ar,rsd_c", "--budget", "target_calls=3",
                 "--target", model_dirs[0], "--draft", model_dirs[1], "--data", data_file,
                 "--max-new-tokens", "10", "--no-warmup", "--out", str(out)]) == 0
    records = read_records(out / "results.jsonl")
    assert {r["method"] for r in records} == {"ar", "rsd_c"}
    assert {r["max_target_calls"] for r in records} == {3}
    assert all(r["target_calls"] <= 3 for r in records)
