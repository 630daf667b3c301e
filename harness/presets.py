"""Named comparisons for `decodebench run --preset NAME`: the methods, their settings and the budgets
a comparison needs. Flags given explicitly win: --methods replaces the list, --set overrides one
knob, --budget replaces the budgets. Add a preset by adding an entry to PRESETS."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    description: str
    methods: list[str]
    settings: dict[str, dict[str, str]] = field(default_factory=dict)  # method -> knob -> value
    budgets: list[str] = field(default_factory=list)  # --budget values, e.g. "target_calls=4,8"


TREE_METHODS = ["ar", "sps", "specinfer_tree", "rsd_c", "rsd_s", "dyspec", "gsd"]

PRESETS: dict[str, Preset] = {
    "trees": Preset(
        "tree and graph drafts at the same draft length (depth 5, sps's gamma); tree sizes differ by design "
        "and the report's Drafting table records them",
        TREE_METHODS,
        {
            "sps": {"gamma": "5"},
            "specinfer_tree": {"expansion": "1,1,3,1,1"},  # the paper's expansion, first 5 levels
            "rsd_c": {"branching": "2,2,1,1,1"},
            "rsd_s": {"beam_width": "3", "depth": "5"},
            "dyspec": {"budget": "16", "max_depth": "5"},  # 64 would mean 65-token target passes
            "gsd": {"max_depth": "5", "max_nodes": "32"},
        },
    ),
    "trees-budget": Preset(
        "tree and graph drafts at the same target budget: 10 drafted tokens verified per target call for "
        "every method, and 4 or 8 target calls per record (RSD's fixed-budget comparison)",
        TREE_METHODS,
        {
            "sps": {"gamma": "10"},
            "specinfer_tree": {"expansion": "2,1,1,1,1"},
            "rsd_c": {"branching": "2,1,1,1,1"},
            "rsd_s": {"beam_width": "2", "depth": "5"},
            "dyspec": {"budget": "10"},
            "gsd": {"max_nodes": "10"},
        },
        ["target_calls=4,8"],
    ),
    "beams": Preset(
        "the beam-speculation papers (DSBD, MJSD) against their references, with output quality; run it "
        "under sampling (e.g. --temperature 1 --top-k 10 --top-p 0.9): at temperature 0 beam sampling, "
        "DSBD and MJSD reduce to greedy decoding",
        ["ar", "sps", "beam_sampling", "beam_search", "dsbd", "mjsd", "diverse_beam"],
    ),
    "draftfree": Preset(
        "methods that need no draft model (rasd fuses retrieval with the draft model's chain, so it loads one), "
        "each at its paper's defaults, beside ar and pld",
        ["ar", "pld", "token_recycling", "aded", "swift", "layer_skip", "rasd", "superposed"],
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def merged_settings(preset: Preset | None, explicit: dict[str, dict]) -> dict[str, dict]:
    """The preset's settings with the explicit --set values on top, knob by knob."""
    out = {method: dict(knobs) for method, knobs in (preset.settings if preset else {}).items()}
    for method, knobs in explicit.items():
        out.setdefault(method, {}).update(knobs)
    return out
