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


def config(name: str, **overrides):
    """`name`'s config; `overrides` change fields (num_hidden_layers also cuts a per-layer `layer_types`)."""
    from transformers import AutoConfig

    values = {**config_dict(name), **overrides}
    if "num_hidden_layers" in overrides and isinstance(values.get("layer_types"), list):
        values["layer_types"] = values["layer_types"][: overrides["num_hidden_layers"]]
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build(name: str, device: str = "cpu", dtype=None, seed: int = 0, **overrides):
    """A model of `name`'s exact shape (or with `overrides`, see `config`) with random weights (seeded),
    initialised on `device` itself (a GPU fills a 1.5B model in a moment; a CPU takes many seconds), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config(name, **overrides), dtype=dtype or torch.float32)
    return model.eval()


class ByteTokenizer:
    """A stand-in tokenizer for random-weight models, which have none: UTF-8 bytes are ids 0-255 (inside any
    vocabulary); an id above 255 decodes as `<id>`. No chat template and no end-of-sequence token, so a
    random model writes up to its token limit. Enough for the harness: encode, decode, get_vocab."""

    eos_token_id = bos_token_id = pad_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        out, run = [], bytearray()
        for i in (int(i) for i in ids):
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(f"<{i}>")
        return "".join(out) + run.decode("utf-8", errors="replace")

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(256)}


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
