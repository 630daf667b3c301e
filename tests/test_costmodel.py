from __future__ import annotations

import pytest

from harness.costmodel import (
    LatencyTable,
    load_profile,
    measure,
    predicted_seconds,
    predicted_speedups,
)

# a toy device: a pass costs 1 s + 0.5 s per extra token, at any context; the draft is 10x cheaper
TARGET = LatencyTable([1, 2, 8], [100, 1000], [[1.0, 1.5, 4.5], [1.0, 1.5, 4.5]])
DRAFT = LatencyTable([1, 8], [100, 1000], [[0.1, 0.45], [0.1, 0.45]])


def test_interpolation_is_linear_and_clamped():
    assert TARGET(4, 500) == pytest.approx(2.5)  # between widths 2 (1.5 s) and 8 (4.5 s)
    assert TARGET(64, 5000) == pytest.approx(4.5 + 0.5 * 56)  # past the widest pass: the last slope
    assert TARGET(1, 5000) == pytest.approx(1.0)  # context clamped at the measured edge
    sloped = LatencyTable([1], [0, 100], [[1.0], [3.0]])
    assert sloped(1, 50) == pytest.approx(2.0)


def test_prediction_equals_a_hand_computation():
    ar = {"method": "ar", "item_id": "a", "turn": 0, "prompt_tokens": 10, "new_tokens": 4,
          "target_widths": [10, 1, 1, 1], "draft_widths": []}
    sps = {"method": "sps", "item_id": "a", "turn": 0, "prompt_tokens": 10, "new_tokens": 4,
           "target_widths": [13], "draft_widths": [10, 1, 1], "draft_calls": 3}
    # ar: prefill of 10 tokens = 4.5 + 0.5 * 2 = 5.5 s, then 3 one-token passes: 8.5 s
    assert predicted_seconds(ar, {"target": TARGET}) == pytest.approx(8.5)
    # sps: one 13-token pass (4.5 + 0.5 * 5 = 7 s) + draft passes (0.45 + 0.05 * 2) + 0.1 + 0.1 = 7.75 s
    assert predicted_seconds(sps, {"target": TARGET, "draft": DRAFT}) == pytest.approx(7.75)
    speedups = predicted_speedups([ar, sps], {"target": TARGET, "draft": DRAFT})
    assert speedups["ar"] == pytest.approx(1.0)
    assert speedups["sps"] == pytest.approx((4 / 7.75) / (4 / 8.5))


def test_measure_fills_every_cell(pair):
    target, _ = pair
    table = measure(target, widths=(1, 4), contexts=(8, 16), repeats=1)
    assert len(table.seconds) == 2 and all(len(row) == 2 and min(row) > 0 for row in table.seconds)


def test_profile_command_writes_latencies_and_the_roofline(model_dirs, tmp_path):
    from harness.cli import main

    target, draft = model_dirs
    out = tmp_path / "profile.json"
    assert main(["profile", "--target", target, "--draft", draft, "--widths", "1,4", "--contexts", "8",
                 "--repeats", "1", "--out", str(out)]) == 0
    profile = load_profile(out)
    assert set(profile["tables"]) == {"target", "draft"}
    assert profile["tables"]["target"].widths == [1, 4] and profile["tables"]["target"].contexts == [8]
    assert all(s > 0 for s in profile["tables"]["draft"].seconds[0])
    assert profile["roofline"]["device"]["read_bandwidth_bytes_s"] > 0
    assert profile["roofline"]["target"]["weight_bytes_per_token"] > 0
