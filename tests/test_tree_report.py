"""The report's Drafting table: tokens verified per target call, accepted drafts, draft calls per token."""
from __future__ import annotations

import pandas as pd

from harness.report import drafting_table


def test_drafting_table_figures():
    ok = pd.DataFrame([
        {"method": "ar", "proposed_lengths": [0, 0], "accept_lengths": [1, 1], "draft_calls": 0, "new_tokens": 2,
         "temperature": 0.0},
        {"method": "rsd_c", "proposed_lengths": [10, 10], "accept_lengths": [4, 2], "draft_calls": 10, "new_tokens": 6,
         "temperature": 0.0},
        {"method": "rsd_c", "proposed_lengths": [6], "accept_lengths": [1], "draft_calls": 5, "new_tokens": 1,
         "temperature": 0.0},
    ])
    table = drafting_table(ok, ["ar", "rsd_c"])
    assert table["columns"][0] == "Method" and not table["sampled"]
    assert table["rows"] == [["rsd_c", "8.67", "1.33", "15.4%", "2.14"]]  # 26/3, 4/3, 4/26, 15/7
    assert drafting_table(ok[ok["method"] == "ar"], ["ar"]) is None
    assert drafting_table(ok.assign(temperature=1.0), ["rsd_c"])["sampled"]
