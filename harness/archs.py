"""The embedded models' architectures without their weights: one `NAME.json` per embedded model, the
`config.json` that decodebench's own conversion writes for it (`python -m harness.archs` regenerates them
from the installed models), less the fields that describe a file rather than a shape.

A forward pass costs the same with random weights, so `build(name, ...)` gives a model of exactly that shape
on any device (a GPU machine that cannot receive the weights, a CI runner) for latency profiles and self-checks.
Imports: torch and transformers only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FOLDER = Path(__file__).parent / "arch_configs"
DROPPED = ("_model_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config")


def names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.json"))


def config_dict(name: str) -> dict:
    path = FOLDER / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no architecture {name!r}; known: {', '.join(names())}")
    return json.loads(path.read_text())


def config(name: str):
    from transformers import AutoConfig

    values = config_dict(name)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build(name: str, device: str = "cpu", dtype=None, seed: int = 0):
    """A model of `name`'s exact shape with random weights (seeded), in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(name), dtype=dtype or torch.float32)
    return model.to(device).eval()


def write(name: str, installed_config: Path) -> Path:
    """`name`.json from the config.json of an installed (converted) embedded model."""
    values = {k: v for k, v in json.loads(installed_config.read_text()).items() if k not in DROPPED}
    out = FOLDER / f"{name}.json"
    out.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":  # regenerate from the installed models: python -m harness.archs [NAME ...]
    from harness import models

    for spec in sys.argv[1:] or list(models.EMBEDDED):
        print(write(spec, models.cached_dir(models.EMBEDDED[spec]) / "config.json"))
