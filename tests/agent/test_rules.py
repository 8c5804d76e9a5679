"""Rules: validation messages, pattern matching, agreement in either arrival order, and
state that survives a round trip through JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from trimtab.detectors import DEFAULT_RULES, RuleError, RuleEvaluator, parse_rule, remedy_for

SPIKE: dict[str, Any] = {
    "name": "spike",
    "key": "loss",
    "detector": "robust_spike",
    "params": {"warmup": 10, "window": 50},
    "confirm": {"key": "grad_norm/total", "detector": "robust_spike", "params": {"warmup": 10}, "window": 3},
}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"name": "a", "key": "loss"}, "detector: required"),
        ({"name": "a", "key": "loss", "detector": "magic"}, "unknown kind 'magic'"),
        ({"name": "a", "key": "loss", "detector": "threshold", "params": {"op": ">"}}, "params:"),
        ({"name": "a", "key": "loss", "detector": "threshold", "params": {"op": ">", "limit": "x"}}, "params"),
        ({"name": "a", "key": "loss", "detector": "threshold", "params": {"op": "!", "limit": 1}}, "op must be"),
        ({"name": "a", "key": "loss", "detector": "robust_spike", "params": {"zz": 1}}, "unknown parameter 'zz'"),
        ({"name": "a", "key": "loss", "detector": "robust_spike", "params": {"z": True}}, "params.z"),
        ({"name": "a", "key": "", "detector": "nonfinite"}, "key: must be a non-empty string"),
        ({"name": "a", "key": "x" * 300, "detector": "nonfinite"}, "at most 256"),
        ({"name": "a", "key": "act/[a", "detector": "nonfinite"}, "unbalanced"),
        ({"name": "a b", "key": "loss", "detector": "nonfinite"}, "name:"),
        ({"name": "a", "key": "lo\x00ss", "detector": "nonfinite"}, "control characters"),
        ({"name": "a", "key": "loss", "detector": "nonfinite", "remedy": "x\x00"}, "remedy:"),
        ({"name": "a", "key": "x", "detector": "threshold", "params": {"op": ">\x00", "limit": 1}}, "control"),
        ({"name": "a", "key": "loss", "detector": "nonfinite", "colour": 1}, "unknown field(s) 'colour'"),
        ({"name": "a", "key": "loss", "detector": "nonfinite", "severity": "meh"}, "severity:"),
        ({"name": "a", "key": "loss", "detector": "nonfinite", "cooldown_s": -1}, "cooldown_s"),
        ({"name": "a", "key": "loss", "detector": "nonfinite", "resolve_after_steps": 1.5}, "resolve_after_steps"),
        ({"name": "a", "key": "loss", "detector": "nonfinite", "enabled": "yes"}, "enabled"),
        ({**SPIKE, "confirm": {"key": "loss", "detector": "nonfinite"}}, "must differ"),
        ({**SPIKE, "confirm": {"key": "g/*", "detector": "nonfinite"}}, "not a pattern"),
        ({**SPIKE, "confirm": {"key": "g", "detector": "nope"}}, "confirm.detector: unknown kind"),
        ({**SPIKE, "confirm": {"key": "g", "detector": "nonfinite", "window": -2}}, "window"),
    ],
)
def test_invalid_rules_name_the_field(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(RuleError) as err:
        parse_rule(body)
    assert needle in str(err.value)


def test_round_trip_and_defaults() -> None:
    spec = parse_rule(SPIKE)
    assert parse_rule(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.remedy == remedy_for("robust_spike", "loss") and spec.remedy
    names = [r.name for r in DEFAULT_RULES]
    assert len(names) == len(set(names)) and "nonfinite-loss" in names
    for rule in DEFAULT_RULES:
        assert parse_rule(rule.to_dict()) == rule and rule.remedy


def test_patterns_match_per_layer_keys() -> None:
    dead = next(r for r in DEFAULT_RULES if r.name == "dead-units")
    assert dead.matches("act/blocks.0.mlp/zero_frac") and not dead.matches("act/blocks.0.mlp/mean")
    exact = parse_rule({"name": "l", "key": "loss", "detector": "nonfinite"})
    assert exact.matches("loss") and not exact.matches("loss2")
    with pytest.raises(ValueError, match="does not match"):
        RuleEvaluator(exact, "loss2")


def _series(n: int, spike_at: int | None, base: float) -> list[float]:
    return [base * (1 + 0.01 * math.sin(i)) * (20 if i == spike_at else 1) for i in range(n)]


@pytest.mark.parametrize("loss_first", [True, False])
def test_agreement_fires_once_in_either_order(loss_first: bool) -> None:
    ev = RuleEvaluator(parse_rule(SPIKE), "loss")
    assert ev.keys == ("loss", "grad_norm/total")
    loss, grad = _series(60, 40, 2.0), _series(60, 41, 5.0)
    order = [("loss", loss), ("grad_norm/total", grad)] if loss_first else [("grad_norm/total", grad), ("loss", loss)]
    found = [f for key, values in order for step, v in enumerate(values) if (f := ev.update(key, step, v))]
    assert len(found) == 1
    assert found[0].step == 40 and found[0].data["confirmed_by"] == {"key": "grad_norm/total", "step": 41}


def test_unconfirmed_spike_is_silent_and_far_apart_signals_do_not_agree() -> None:
    ev = RuleEvaluator(parse_rule(SPIKE), "loss")
    loss, grad = _series(60, 30, 2.0), _series(60, 50, 5.0)  # 20 steps apart, window 3
    found = [
        f
        for step in range(60)
        for key, v in (("loss", loss[step]), ("grad_norm/total", grad[step]))
        if (f := ev.update(key, step, v))
    ]
    assert found == []


def test_rule_severity_overrides_detector() -> None:
    body = {"name": "t", "key": "x", "detector": "threshold", "params": {"op": ">", "limit": 1}}
    plain = RuleEvaluator(parse_rule(body), "x").update("x", 0, 2.0)
    loud = RuleEvaluator(parse_rule({**body, "severity": "critical"}), "x").update("x", 0, 2.0)
    assert plain is not None and plain.severity == "warning"
    assert loud is not None and loud.severity == "critical" and loud.data["rule"] == "t"
    assert RuleEvaluator(parse_rule(body), "x").update("other", 0, 2.0) is None


def test_state_round_trip_continues_identically() -> None:
    spec = parse_rule(SPIKE)
    loss, grad = _series(80, 60, 2.0), _series(80, 61, 5.0)
    whole = RuleEvaluator(spec, "loss")
    resumed = RuleEvaluator(spec, "loss")
    a, b = [], []
    for step in range(80):
        if step == 35:
            resumed = RuleEvaluator.restore(spec, "loss", json.loads(json.dumps(resumed.state())))
        for key, v in (("loss", loss[step]), ("grad_norm/total", grad[step])):
            a.append(whole.update(key, step, v))
            b.append(resumed.update(key, step, v))
    assert a == b and sum(f is not None for f in a) == 1


def test_stale_state_is_refused() -> None:
    spec = parse_rule(SPIKE)
    state = RuleEvaluator(spec, "loss").state()
    changed = parse_rule({**SPIKE, "params": {"warmup": 10, "window": 60}})
    with pytest.raises(ValueError, match="does not fit"):
        RuleEvaluator.restore(changed, "loss", state)


def test_huge_integers_are_refused_not_crashed_on() -> None:
    huge = 10**400
    with pytest.raises(RuleError, match="cooldown_s"):
        parse_rule({"name": "a", "key": "loss", "detector": "nonfinite", "cooldown_s": huge})
    with pytest.raises(RuleError, match=r"params\.limit"):
        parse_rule({"name": "a", "key": "x", "detector": "threshold", "params": {"op": ">", "limit": huge}})


def test_state_is_strict_json_even_with_infinite_scores() -> None:
    body = {**SPIKE, "detector": "gross_magnitude", "params": {"reference": 3, "skip": 0}}
    spec = parse_rule(body)
    ev = RuleEvaluator(spec, "loss")
    for step, value in enumerate([0.0, 0.0, 0.0, 1e10]):  # early maximum 0: the score overflows to inf
        assert ev.update("loss", step, value) is None  # pending: no grad-norm confirmation yet
    assert ev.state()["pending"][0][-1] == "inf"
    text = json.dumps(ev.state(), allow_nan=False)  # PostgreSQL's json type has no Infinity
    again = RuleEvaluator.restore(spec, "loss", json.loads(text))
    assert again.state() == ev.state()


def test_docs_list_every_shipped_rule() -> None:
    from pathlib import Path

    table = (Path(__file__).parents[2] / "docs" / "alerts.md").read_text()
    missing = [r.name for r in DEFAULT_RULES if f"| `{r.name}` |" not in table]
    assert missing == [], f"docs/alerts.md's defaults table lacks {missing}"
