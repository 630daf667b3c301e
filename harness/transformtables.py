"""Tables of a likelihood run's model transforms: perplexity against the untransformed model, and the paper's
perturbation sweep (Gong et al., methods/quant_perturbation.py): word perplexity against the relative strength
of each kind of perturbation, from records of several runs (one strength per run: `decodebench report RUN...`).
"""
from __future__ import annotations

import pandas as pd

from harness.longtables import pooled_perplexity

SWEEP_KEYS = ("on", "kind", "strength")


def _perturbation(settings) -> tuple | None:
    """(on, kind, strength) of a perturb-mode transform's settings; None for anything else (match_quant's
    strength is per matrix, not one number)."""
    if not isinstance(settings, dict) or settings.get("mode") != "perturb" or settings.get("match_quant"):
        return None
    return tuple(settings.get(key) for key in SWEEP_KEYS)


def perturbation_sweep(reading: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, on, kind, strength) of perturbed records (`model`: a column the records of several
    runs carry; one run has one model); empty unless at least two strengths of one kind are there."""
    if reading.empty or "transform_settings" not in reading:
        return pd.DataFrame()
    keys = reading["transform_settings"].map(_perturbation)
    perturbed = reading[keys.notna()].assign(**{key: keys[keys.notna()].map(lambda k, i=i: k[i])
                                                for i, key in enumerate(SWEEP_KEYS)})
    if perturbed.empty or perturbed.groupby(["on", "kind"])["strength"].nunique().max() < 2:
        return pd.DataFrame()
    group = ["model"] if "model" in perturbed else []
    rows = [{**dict(zip(group + list(SWEEP_KEYS), key if isinstance(key, tuple) else (key,))), **pooled_perplexity(own)}
            for key, own in perturbed.groupby(group + list(SWEEP_KEYS), sort=True)]
    return pd.DataFrame(rows)


def baseline_levels(reading: pd.DataFrame, baseline: str) -> dict[str, float]:
    """Word perplexity of the untransformed baseline and of every quantization method, pooled, per model when
    the records carry several (the plot's reference lines)."""
    levels = {}
    if reading.empty:
        return levels
    models = reading["model"].nunique() if "model" in reading else 1
    keys = ["model", "method"] if models > 1 else ["method"]
    for key, own in reading.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        settings = own["transform_settings"].iloc[0] if "transform_settings" in own else None
        if key[-1] == baseline or (isinstance(settings, dict) and settings.get("mode") == "quant"):
            levels[" ".join(map(str, key))] = pooled_perplexity(own)["word ppl"]
    return levels
