"""The embedded models' architectures shipped without weights: each matches the installed model's config
where it is installed, builds a random-weight model of that exact shape, and profiles through the CLI."""
from __future__ import annotations

import json

import pytest

from harness import archs, cli, models


def test_every_embedded_model_has_an_architecture():
    assert archs.names() == sorted(models.EMBEDDED)
    for name in archs.names():
        values = archs.config_dict(name)
        assert not set(values) & set(archs.DROPPED) and values["max_position_embeddings"] >= 8192


@pytest.mark.parametrize("name", sorted(models.EMBEDDED))
def test_architecture_matches_the_installed_conversion(name):
    installed = models.cached_dir(models.EMBEDDED[name]) / "config.json"
    if not installed.is_file():
        pytest.skip(f"{name} is not installed here")
    full = {k: v for k, v in json.loads(installed.read_text()).items() if k not in archs.DROPPED}
    assert archs.config_dict(name) == full


def test_random_weights_have_the_real_shape():
    model = archs.build("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert archs.config("qwen2.5-coder-1.5b").num_hidden_layers == 28


def test_profile_an_architecture_without_weights(tmp_path, capsys):
    out = tmp_path / "profile.json"
    code = cli.main(["profile", "--arch", "smollm2-135m", "--widths", "1,4", "--contexts", "16", "--repeats", "1",
                     "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    profile = json.loads(out.read_text())
    assert profile["models"] == {"target": "smollm2-135m (architecture, random weights)"}
    table = profile["tables"]["target"]
    assert table["widths"] == [1, 4] and table["contexts"] == [16] and all(s > 0 for s in table["seconds"][0])
    assert cli.main(["profile", "--arch", "llama-7b", "--out", str(tmp_path / "x.json")]) == 2
    assert "no architecture 'llama-7b'" in capsys.readouterr().out
