"""Roofline arithmetic on hand-made figures, weight bytes of tiny models, and the report section."""
import json
import math

import pytest

from harness import roofline
from harness.report import build_report
from tests.conftest import tiny_llama

DEVICE = {"read_bandwidth_bytes_s": 10e9, "matmul_flops_s": 100e9, "dtype": "float32", "method": "test"}
MODEL = {"weight_bytes_per_token": 2e9, "bytes_per_parameter": 4.0}


def test_efficiency_matches_hand_computation():
    reached = roofline.efficiency(DEVICE, MODEL, decode_tokens_per_s=2.5)
    assert reached["memory_bound_tokens_per_s"] == pytest.approx(5.0)  # 10 GB/s / 2 GB
    assert reached["fraction"] == pytest.approx(0.5)
    assert reached["ridge_width"] == pytest.approx(20.0)  # 100e9 * 4 / (2 * 10e9)


def test_decode_speed_leaves_out_prefill_and_failed_records():
    records = [{"new_tokens": 11, "decode_s": 5.0}, {"new_tokens": 21, "decode_s": 5.0},
               {"new_tokens": 9, "decode_s": 1.0, "error": "boom"}, {"new_tokens": 1, "decode_s": 0.0}]
    assert roofline.decode_tokens_per_s(records) == pytest.approx(3.0)  # mean of 2 and 4
    assert math.isnan(roofline.decode_tokens_per_s([]))


def test_weight_bytes_count_tied_weights_once_and_one_row_of_an_untied_embedding():
    untied = tiny_llama()
    everything = sum(p.numel() * 4 for p in untied.parameters())
    table = untied.get_input_embeddings().weight
    assert roofline.weight_bytes_per_token(untied) == everything - table.numel() * 4 + table.shape[1] * 4
    tied = tiny_llama()
    tied.lm_head.weight = tied.get_input_embeddings().weight
    unique = {id(p): p for p in tied.parameters()}.values()
    assert roofline.weight_bytes_per_token(tied) == sum(p.numel() * 4 for p in unique)
    assert roofline.model_roof(tied)["bytes_per_parameter"] == 4.0


def test_measure_gives_positive_figures_on_this_cpu():
    measured = roofline.measure("cpu")
    assert measured["read_bandwidth_bytes_s"] > 1e8 and measured["matmul_flops_s"] > 1e8
    assert roofline.measure("cpu") is measured  # once per process


def test_report_places_ar_under_the_roofline(tmp_path):
    records = [{"method": "ar", "category": "qa", "item_id": f"q{i}", "turn": 0, "new_tokens": 11, "wall_s": 6.0,
                "decode_s": 5.0, "tokens_per_s": 11 / 6, "target_calls": 11, "mean_accepted": 1.0,
                "peak_mem_bytes": 2**30, "energy_j": 5.5, "error": None} for i in range(2)]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "manifest.json").write_text(json.dumps({"roofline": {"device": DEVICE, "target": MODEL}}))
    folder = build_report(tmp_path)
    markdown = (folder / "report.md").read_text()
    section = markdown.split("## Roofline\n", 1)[1].split("\n## ", 1)[0]
    assert "10.0 GB/s" in section and "5.0 tokens/s" in section and "2.00 tokens/s" in section
    assert "| 40% |" in section  # 2 of a 5 tokens/s limit
    assert (folder / "memory_energy.png").stat().st_size > 0
