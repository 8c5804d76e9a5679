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
@pytest.mark.parametrize(("loss_at", "grad_at"), [(40, 41), (41, 40), (40, 40)])
def test_agreement_fires_once_in_either_order(loss_first: bool, loss_at: int, grad_at: int) -> None:
    ev = RuleEvaluator(parse_rule(SPIKE), "loss")
    assert ev.keys == ("loss", "grad_norm/total")
    loss, grad = _series(60, loss_at, 2.0), _series(60, grad_at, 5.0)
    order = ("loss", "grad_norm/total") if loss_first else ("grad_norm/total", "loss")
    series = {"loss": loss, "grad_norm/total": grad}
    found = [f for step in range(60) for key in order if (f := ev.update(key, step, series[key][step]))]
    assert len(found) == 1 and found[0].severity == "warning"
    assert found[0].step == loss_at and found[0].data["confirmed_by"] == {"key": "grad_norm/total", "step": grad_at}


def _fed(spec: dict[str, Any], loss: list[float], grad: list[float]) -> list[Any]:
    ev = RuleEvaluator(parse_rule(spec), "loss")
    return [
        f
        for step in range(len(loss))
        for key, v in (("loss", loss[step]), ("grad_norm/total", grad[step]))
        if (f := ev.update(key, step, v))
    ]


def test_an_unconfirmed_finding_is_an_info_annotation_once_its_window_passed() -> None:
    loss, grad = _series(60, 30, 2.0), _series(60, 50, 5.0)  # 20 steps apart, window 3
    [found] = _fed(SPIKE, loss, grad)
    assert (found.severity, found.step, found.data["unconfirmed"]) == ("info", 30, True)
    assert "grad_norm/total did not confirm it within 3 steps" in found.message
    # The grad-norm spike at 50 has no loss finding near it: nothing more.


def test_unconfirmed_findings_can_be_dropped() -> None:
    body = {**SPIKE, "confirm": {**SPIKE["confirm"], "unconfirmed": "drop"}}
    assert _fed(body, _series(60, 30, 2.0), _series(60, 50, 5.0)) == []
    with pytest.raises(RuleError, match=r"confirm\.unconfirmed"):
        parse_rule({**SPIKE, "confirm": {**SPIKE["confirm"], "unconfirmed": "warn"}})


def test_a_level_shift_is_info_and_a_spike_with_a_gradient_jump_pages() -> None:
    """The shipped loss-spike rule: the loss steps up and stays (the gradient norm rises 2x:
    healthy) gives info findings only; the same jump with the gradient norm 10x pages."""
    rule = next(r for r in DEFAULT_RULES if r.name == "loss-spike")
    body = rule.to_dict()
    loss = [2.0 * (1 + 0.01 * math.sin(i)) * (1.6 if i >= 100 else 1) for i in range(160)]
    calm = [0.5 * (1 + 0.01 * math.cos(i)) * (2 if 100 <= i < 110 else 1) for i in range(160)]
    shift = _fed(body, loss, calm)
    assert shift and {f.severity for f in shift} == {"info"} and shift[0].step == 100
    jump = [0.5 * (1 + 0.01 * math.cos(i)) * (10 if i == 100 else 1) for i in range(160)]
    paged = _fed(body, loss, jump)
    assert paged[0].step == 100 and paged[0].severity == "critical"


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
