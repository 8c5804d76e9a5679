"""The one JSON policy: what every stored or sent JSON value goes through, and its inverse."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from trimtab import jsonsafe
from trimtab.jsonsafe import MAX_DEPTH, TOO_DEEP, float_from_json, float_to_json, from_json, problem, to_json


@pytest.mark.parametrize("value", [0.0, -0.0, 1.5, 1e308, -1e-308, math.nan, math.inf, -math.inf])
def test_floats_round_trip(value: float) -> None:
    back = float_from_json(float_to_json(value))
    assert back == value or (math.isnan(back) and math.isnan(value))
    assert str(float_to_json(value)) in ("NaN", "Infinity", "-Infinity") or math.isfinite(value)


def test_unknown_strings_are_not_floats() -> None:
    with pytest.raises(ValueError, match="not a trimtab JSON float"):
        float_from_json("nan")


def test_a_config_with_every_awkward_value_is_stored_and_read_back() -> None:
    config = {
        "lr": 3e-4,
        "clip": math.inf,
        "warmup": (1, 2),
        "bad\x00key": "nul\x00here",
        "big": 2**70,
        "blob": b"abc",
        "dtype": torch.float32,
        "scalar": torch.tensor(0.5),
        "nested": {"loss_floor": -math.inf, "list": [math.nan, 1]},
        7: "int key",
    }
    stored = to_json(config)
    text = json.dumps(stored, allow_nan=False)  # plain JSON: PostgreSQL's json takes it
    assert "\\u0000" not in text and problem(stored) is None
    back = from_json(json.loads(text))
    assert back["clip"] == math.inf and back["nested"]["loss_floor"] == -math.inf
    assert math.isnan(back["nested"]["list"][0]) and back["nested"]["list"][1] == 1
    assert back["warmup"] == [1, 2] and back["badkey"] == "nulhere" and back["big"] == str(2**70)
    assert back["blob"] == "(3 bytes)" and back["dtype"] == "torch.float32" and back["scalar"] == 0.5
    assert back["7"] == "int key" and back["lr"] == 3e-4


def test_depth_is_limited_and_the_limit_passes_the_servers_check() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH + 5):
        deep = {"a": [deep]}
    stored = to_json(deep)
    assert problem(stored) is None
    text = json.dumps(stored)
    assert TOO_DEEP in text and text.count("[") <= MAX_DEPTH


def test_problem_names_what_the_server_refuses() -> None:
    assert problem({"x": math.nan}) == "non-finite floats cannot be stored as JSON"
    assert problem({"x\x00": 1}) == "strings may not contain NUL"
    assert problem({1: 1}) == "map keys must be strings"
    assert problem([2**64]) == "integer out of the 64-bit range"
    assert problem(object()) == "values of type object cannot be stored as JSON"
    assert problem({"ok": [1, "two", None, True, {"three": 3.0}]}) is None


def test_dumps_is_compact_strict_json() -> None:
    assert jsonsafe.dumps({"v": math.inf, "w": [1.0]}) == b'{"v":"Infinity","w":[1.0]}'
