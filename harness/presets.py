"""Named method lists for `decodebench run --preset NAME` (what a paper's comparison needs)."""
from __future__ import annotations

PRESETS: dict[str, list[str]] = {
    # the beam-speculation papers (DSBD, MJSD) against their references, with output quality
    "beams": ["ar", "sps", "beam_sampling", "beam_search", "dsbd", "mjsd", "diverse_beam"],
}


def preset(name: str) -> list[str]:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return list(PRESETS[name])
