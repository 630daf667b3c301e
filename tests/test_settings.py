"""The method contract's settings: strict parsing, ranges and choices checked when a method is built,
help for every setting, and listings that scripts and pipes can read."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import typing

import pytest

from methods.base import (
    SettingError,
    Settings,
    describe_settings,
    get_method,
    parse_setting,
    policies,
    registry,
    scorers,
    setting,
    transforms,
)


@dataclasses.dataclass
class Example(Settings):
    gamma: int = setting(5, "draft tokens", low=0)
    mode: typing.Literal["best", "tree"] = setting("best", "which beams")
    widths: tuple[int, ...] = setting((2, 1), "children per level", low=1)
    flag: bool = setting(False, "a switch")
    ratio: float = setting(0.5, "a share", low=0.0, high=1.0)


HINTS = typing.get_type_hints(Example)


@pytest.mark.parametrize("name,text,value", [
    ("gamma", "3", 3), ("mode", "tree", "tree"), ("widths", "3,2,1", (3, 2, 1)), ("flag", "true", True),
    ("flag", "off", False), ("ratio", "0.25", 0.25),
])
def test_cli_strings_parse_to_the_fields_type(name, text, value):
    assert parse_setting(name, text, HINTS[name]) == value


@pytest.mark.parametrize("name,text", [("gamma", "2.5"), ("flag", "flase"), ("mode", "all"), ("widths", "2,x"),
                                       ("ratio", "half")])
def test_unparsable_strings_are_errors_naming_the_setting(name, text):
    with pytest.raises(SettingError, match=name):
        parse_setting(name, text, HINTS[name])


@pytest.mark.parametrize("bad", [{"gamma": -1}, {"mode": "all"}, {"widths": (0,)}, {"widths": ()}, {"ratio": 1.5},
                                 {"flag": "yes"}, {"gamma": True}])
def test_out_of_range_or_mistyped_values_fail_when_built(bad):
    with pytest.raises(SettingError, match=next(iter(bad))):
        Example(**bad)


def test_describe_settings_gives_type_default_range_and_help():
    rows = {row["name"]: row for row in describe_settings(Example)}
    assert rows["widths"]["type"].startswith("list of int") and rows["widths"]["default"] == (2, 1)
    assert rows["ratio"]["allowed"] == "[0, 1]" and rows["mode"]["allowed"] == "best, tree"
    assert rows["gamma"]["help"] == "draft tokens"


METHODS = registry()


@pytest.mark.parametrize("name", list(METHODS))
def test_every_setting_has_help_and_a_default_that_builds(name):
    cls = METHODS[name]
    cls()  # the defaults are valid
    for row in describe_settings(cls.Config):
        assert row["help"], f"{name}.{row['name']} has no help text"


def _out_of_range(row: dict, field: dataclasses.Field):
    low, high = field.metadata.get("low"), field.metadata.get("high")
    value = (low - 1) if low is not None else (high + 1) if high is not None else None
    if value is None:
        return None
    if isinstance(row["default"], int) and not isinstance(row["default"], bool):
        value = int(value)
    if isinstance(row["default"], tuple):
        value = (value,)
    return value


@pytest.mark.parametrize("name", [n for n in METHODS if any(
    f.metadata.get("low") is not None or f.metadata.get("high") is not None
    for f in dataclasses.fields(METHODS[n].Config))])
def test_every_method_rejects_an_out_of_range_value_when_built(name):
    cls = METHODS[name]
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    for row in describe_settings(cls.Config):
        value = _out_of_range(row, fields[row["name"]])
        if value is None:
            continue
        with pytest.raises(SettingError, match=rf"{name}\.{row['name']}"):
            cls(**{row["name"]: value})
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        with pytest.raises(SettingError, match=rf"{name}\.{row['name']}"):
            cls(**{row["name"]: text})  # as the CLI passes it


def test_an_unknown_setting_names_the_known_ones():
    with pytest.raises(SettingError, match="has no setting gama.*gamma"):
        get_method("sps")(gama=3)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=120)


def test_listings_are_not_truncated_when_piped_and_have_json():
    listing = _cli("methods")
    assert listing.returncode == 0
    names = {line.split("\t")[0] for line in listing.stdout.splitlines()[1:]}
    # decoders and the modifiers composed with them
    everything = set(METHODS) | set(policies()) | set(transforms()) | set(scorers())
    assert names == everything
    described = json.loads(_cli("methods", "--json").stdout)
    assert {d["name"] for d in described} == everything and all("settings" in d for d in described)
    one = _cli("methods", "sps")
    assert "gamma" in one.stdout and "int" in one.stdout
    assert "specbench" in {s["name"] for s in json.loads(_cli("suites", "--json").stdout)}


def test_a_bad_setting_exits_2_before_any_model_loads(tmp_path):
    start = time.perf_counter()
    result = _cli("run", "--methods", "ar,sps", "--set", "sps.gamma=-1", "--target", str(tmp_path / "no-such-model"),
                  "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sps.gamma" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "results.jsonl").exists()
    assert time.perf_counter() - start < 60  # generous on a loaded 2-core machine; measured ~5 s idle


def test_a_setting_for_a_method_not_in_the_run_is_an_error(tmp_path):
    result = _cli("run", "--methods", "ar", "--set", "sps.gamma=3", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "sps" in result.stdout + result.stderr
