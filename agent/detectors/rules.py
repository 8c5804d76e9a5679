"""Rules: a detector on a key (or a glob of keys), with an optional confirming detector on a
second key, a severity, a remedy hint and the alert engine's settings.

``parse_rule(body)`` validates a JSON body (the REST API's, or a policy pushed to the agent)
and raises :class:`RuleError` naming the field at fault. ``RuleEvaluator(spec, key)`` runs
one rule on one matched key of one run and rank; its state is JSON-safe and restorable, so
the server resumes after a restart where it stopped.

Multi-signal agreement (``confirm``): a finding of the rule's detector counts only when the
confirming detector, on its own key, also fired within ``window`` steps before or after it.
Findings of each side wait, bounded, for the other. A finding the window passed without
agreement becomes an ``info`` finding (``confirm.unconfirmed: "info"``, the default: an
annotation, never notified; for the shipped loss rules, a level shift with healthy
gradients) or is dropped (``"drop"``).
"""

from __future__ import annotations

import inspect
import json
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from trimtab.detectors.remedies import remedy_for
from trimtab.detectors.series import CRITICAL, INFO, WARNING, Detector, Finding, RobustSpike

MAX_KEY_LENGTH = 256
MAX_NAME_LENGTH = 128
MAX_REMEDY_LENGTH = 500
# Findings of one side kept while they wait for the other side of a confirmation.
MAX_PENDING = 64


class RuleError(ValueError):
    """A rule body is invalid; the message names the field and the reason."""


@dataclass(frozen=True)
class ConfirmSpec:
    key: str
    detector: str
    params: dict[str, Any] = field(default_factory=dict)
    window: int = 10
    unconfirmed: str = INFO  # what an unconfirmed finding becomes: "info" or "drop"

    def to_dict(self) -> dict[str, Any]:
        body = {"key": self.key, "detector": self.detector, "params": dict(self.params), "window": self.window}
        return {**body, "unconfirmed": self.unconfirmed}


@dataclass(frozen=True)
class RuleSpec:
    name: str
    key: str
    detector: str
    params: dict[str, Any] = field(default_factory=dict)
    severity: str | None = None
    confirm: ConfirmSpec | None = None
    cooldown_s: float = 300.0
    resolve_after_steps: int = 100
    enabled: bool = True
    remedy: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "detector": self.detector,
            "params": dict(self.params),
            "severity": self.severity,
            "confirm": self.confirm.to_dict() if self.confirm else None,
            "cooldown_s": self.cooldown_s,
            "resolve_after_steps": self.resolve_after_steps,
            "enabled": self.enabled,
            "remedy": self.remedy,
        }

    @property
    def is_pattern(self) -> bool:
        return any(c in self.key for c in "*?[")

    def matches(self, key: str) -> bool:
        return fnmatchcase(key, self.key) if self.is_pattern else key == self.key

    def watched_keys(self, key: str) -> tuple[str, ...]:
        """The series an evaluator for the matched ``key`` consumes."""
        return (key, self.confirm.key) if self.confirm else (key,)

    def fingerprint(self) -> str:
        """What a detector's state depends on: a state saved under another fingerprint is stale."""
        parts = {
            "detector": self.detector,
            "params": self.params,
            "confirm": self.confirm.to_dict() if self.confirm else None,
        }
        return json.dumps(parts, sort_keys=True)


_RULE_FIELDS = {
    "name",
    "key",
    "detector",
    "params",
    "severity",
    "confirm",
    "cooldown_s",
    "resolve_after_steps",
    "enabled",
    "remedy",
}
_CONFIRM_FIELDS = {"key", "detector", "params", "window", "unconfirmed"}
UNCONFIRMED = (INFO, "drop")


def detector_kinds() -> list[str]:
    return sorted(Detector.kinds())


def make_detector(kind: str, params: Mapping[str, Any], where: str = "") -> Detector:
    """A fresh detector of ``kind`` built from JSON ``params``; RuleError on anything wrong."""
    cls = Detector.kinds().get(kind)
    if cls is None:
        raise RuleError(f"{where}detector: unknown kind {kind!r}; expected one of {', '.join(detector_kinds())}")
    if not isinstance(params, Mapping):
        raise RuleError(f"{where}params: must be an object, got {type(params).__name__}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for name, value in params.items():
        if name not in accepted:
            hint = f"; {kind} takes {', '.join(accepted)}" if accepted else f"; {kind} takes none"
            raise RuleError(f"{where}params: unknown parameter {name!r}{hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RuleError(f"{where}params.{name}: must be a number or a string, got {json.dumps(value)}")
        if isinstance(value, (int, float)) and not _finite(value):
            raise RuleError(f"{where}params.{name}: must be a finite number of sensible size, got {str(value)[:40]}")
        if isinstance(value, str) and _has_control(value):
            raise RuleError(f"{where}params.{name}: control characters are not allowed")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise RuleError(f"{where}params: {exc}") from None


def _check_key(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RuleError(f"{where}: must be a non-empty string")
    if len(value) > MAX_KEY_LENGTH:
        raise RuleError(f"{where}: at most {MAX_KEY_LENGTH} characters, got {len(value)}")
    if value != value.strip() or _has_control(value):
        raise RuleError(f"{where}: no leading/trailing spaces or control characters")
    if value.count("[") != value.count("]"):
        raise RuleError(f"{where}: unbalanced '[' in the pattern {value!r}")
    return value


def _finite(value: int | float) -> bool:
    """Finite and representable as a float (a 400-digit JSON integer is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _has_control(text: str, allowed: str = "") -> bool:
    """NUL and other control characters (PostgreSQL cannot store NUL in text)."""
    return any((ord(c) < 32 or ord(c) == 127) and c not in allowed for c in text)


def _number(body: Mapping[str, Any], name: str, default: float, *, minimum: float, integer: bool = False) -> Any:
    value = body.get(name, default)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not _finite(value) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise RuleError(f"{name}: must be {kind} >= {minimum:g}, got {json.dumps(value)}")
    return int(value) if integer else float(value)


def parse_rule(body: Mapping[str, Any]) -> RuleSpec:
    """Validate a rule body (see the module docstring and docs/alerts.md)."""
    if not isinstance(body, Mapping):
        raise RuleError(f"a rule must be an object, got {type(body).__name__}")
    unknown = sorted(set(body) - _RULE_FIELDS)
    if unknown:
        raise RuleError(f"unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(sorted(_RULE_FIELDS))}")
    for required in ("name", "key", "detector"):
        if required not in body:
            raise RuleError(f"{required}: required")
    name = body["name"]
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_NAME_LENGTH
        or not name.replace("-", "").replace("_", "").isalnum()
    ):
        raise RuleError(f"name: 1-{MAX_NAME_LENGTH} letters, digits, '-' or '_', got {json.dumps(name)}")
    key = _check_key(body["key"], "key")
    kind = body["detector"]
    if not isinstance(kind, str):
        raise RuleError(f"detector: must be a string, got {json.dumps(kind)}")
    params = body.get("params") or {}
    make_detector(kind, params)
    severity = body.get("severity")
    if severity is not None and severity not in (INFO, WARNING, CRITICAL):
        raise RuleError(f"severity: must be {INFO!r}, {WARNING!r}, {CRITICAL!r} or null, got {json.dumps(severity)}")
    confirm = _parse_confirm(body.get("confirm"), key)
    enabled = body.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleError(f"enabled: must be true or false, got {json.dumps(enabled)}")
    remedy = body.get("remedy")
    if remedy is None:
        remedy = remedy_for(kind, key)
    elif not isinstance(remedy, str) or len(remedy) > MAX_REMEDY_LENGTH or _has_control(remedy, "\n"):
        raise RuleError(
            f"remedy: a string of at most {MAX_REMEDY_LENGTH} characters without control characters, or null"
        )
    return RuleSpec(
        name=name,
        key=key,
        detector=kind,
        params=dict(params),
        severity=severity,
        confirm=confirm,
        cooldown_s=_number(body, "cooldown_s", 300.0, minimum=0),
        resolve_after_steps=_number(body, "resolve_after_steps", 100, minimum=1, integer=True),
        enabled=enabled,
        remedy=remedy,
    )


def _parse_confirm(body: Any, key: str) -> ConfirmSpec | None:
    if body is None:
        return None
    if not isinstance(body, Mapping):
        raise RuleError(f"confirm: must be an object or null, got {json.dumps(body)}")
    unknown = sorted(set(body) - _CONFIRM_FIELDS)
    if unknown:
        raise RuleError(
            f"confirm: unknown field(s) {', '.join(map(repr, unknown))}; "
            "expected key, detector, params, window, unconfirmed"
        )
    for required in ("key", "detector"):
        if required not in body:
            raise RuleError(f"confirm.{required}: required")
    confirm_key = _check_key(body["key"], "confirm.key")
    if any(c in confirm_key for c in "*?["):
        raise RuleError("confirm.key: must be one exact key, not a pattern")
    if confirm_key == key:
        raise RuleError("confirm.key: must differ from key (agreement needs a second signal)")
    kind = body["detector"]
    if not isinstance(kind, str):
        raise RuleError(f"confirm.detector: must be a string, got {json.dumps(kind)}")
    params = body.get("params") or {}
    make_detector(kind, params, "confirm.")
    window = _number(body, "window", 10, minimum=0, integer=True)
    unconfirmed = body.get("unconfirmed", INFO)
    if unconfirmed not in UNCONFIRMED:
        raise RuleError(f"confirm.unconfirmed: must be {INFO!r} or 'drop', got {json.dumps(unconfirmed)}")
    return ConfirmSpec(confirm_key, kind, dict(params), window, unconfirmed)


class RuleEvaluator:
    """One rule on one matched key (of one run and rank). Feed every point of every key in
    ``keys`` in step order, across keys too (a confirmation pairs the findings of two keys,
    so the order they arrive in decides which steps pair up); ``update`` returns the rule's
    findings (severity already set from the rule)."""

    def __init__(self, spec: RuleSpec, key: str) -> None:
        if not spec.matches(key):
            raise ValueError(f"rule {spec.name!r} ({spec.key!r}) does not match key {key!r}")
        self.spec, self.key = spec, key
        self.keys = spec.watched_keys(key)
        self._primary = make_detector(spec.detector, spec.params)
        self._confirm = make_detector(spec.confirm.detector, spec.confirm.params) if spec.confirm else None
        # Unconfirmed findings of the primary key, and steps where the confirming key fired.
        self._pending: deque[Finding] = deque()
        self._confirmed_at: deque[int] = deque()

    def update(self, key: str, step: int, value: float) -> Finding | None:
        if key == self.key:
            expired = self._expire(step)
            found = self._primary.update(step, value)
            if found is None:
                return expired
            if self.spec.confirm is None:
                return self._finish(found)
            agree = [s for s in self._confirmed_at if abs(s - step) <= self.spec.confirm.window]
            if agree:
                return self._finish(found, agree[-1])
            self._pending.append(found)
            while len(self._pending) > MAX_PENDING:
                self._pending.popleft()
            return expired
        if self._confirm is not None and self.spec.confirm is not None and key == self.spec.confirm.key:
            if self._confirm.update(step, value) is None:
                return None
            window = self.spec.confirm.window
            self._confirmed_at.append(step)
            while len(self._confirmed_at) > MAX_PENDING or self._confirmed_at[0] < step - 4 * window - 1:
                self._confirmed_at.popleft()
            matched = [f for f in self._pending if abs(f.step - step) <= window]
            if not matched:
                return None
            for f in matched:
                self._pending.remove(f)
            # One finding per agreement: the one nearest the confirming signal (the earlier on
            # a tie), so a spike is named at its own step, not at the newest finding waiting.
            nearest = min(matched, key=lambda f: (abs(f.step - step), f.step))
            return self._finish(nearest, step)
        return None

    def _expire(self, step: int) -> Finding | None:
        """Findings whose window has passed unconfirmed (every point up to ``step - 1`` has been
        fed): the newest of them as ``info``, unless the rule drops them."""
        confirm = self.spec.confirm
        if confirm is None:
            return None
        newest = None
        while self._pending and self._pending[0].step + confirm.window < step:
            newest = self._pending.popleft()
            if isinstance(self._primary, RobustSpike):
                self._primary.accept(newest.value)  # a level shift: the new level becomes the normal
        if newest is None or confirm.unconfirmed != INFO:
            return None
        data = {**newest.data, "rule": self.spec.name, "key": self.key, "unconfirmed": True}
        message = f"{newest.message}; {confirm.key} did not confirm it within {confirm.window} steps"
        return replace(newest, severity=INFO, message=message, data=data)

    def _finish(self, found: Finding, confirmed_at: int | None = None) -> Finding:
        severity = self.spec.severity or found.severity
        data = {**found.data, "rule": self.spec.name, "key": self.key}
        message = found.message
        if confirmed_at is not None and self.spec.confirm is not None:
            data["confirmed_by"] = {"key": self.spec.confirm.key, "step": confirmed_at}
            message = f"{message}; confirmed by {self.spec.confirm.key} at step {confirmed_at}"
        return replace(found, severity=severity, message=message, data=data)

    def state(self) -> dict[str, Any]:
        return {
            "v": 1,
            "fingerprint": self.spec.fingerprint(),
            "key": self.key,
            "primary": self._primary.state(),
            "confirm": self._confirm.state() if self._confirm else None,
            "pending": [_finding_state(f) for f in self._pending],
            "confirmed_at": list(self._confirmed_at),
        }

    @classmethod
    def restore(cls, spec: RuleSpec, key: str, state: Mapping[str, Any]) -> RuleEvaluator:
        if state.get("v") != 1 or state.get("fingerprint") != spec.fingerprint() or state.get("key") != key:
            raise ValueError(f"saved state does not fit rule {spec.name!r} on {key!r} (the rule changed?)")
        ev = cls(spec, key)
        ev._primary = Detector.restore(state["primary"])
        if ev._confirm is not None:
            ev._confirm = Detector.restore(state["confirm"])
        ev._pending.extend(_finding_from_state(f) for f in state["pending"])
        ev._confirmed_at.extend(int(s) for s in state["confirmed_at"])
        return ev


def _finding_state(f: Finding) -> list[Any]:
    return [
        f.detector,
        f.step,
        _json_float(f.value),
        f.severity,
        f.message,
        _json_float(f.baseline),
        _json_float(f.score),
    ]


def _json_float(value: float | None) -> float | str | None:
    """JSON (and PostgreSQL's json type) have no NaN or Infinity: those become strings."""
    return value if value is None or math.isfinite(value) else str(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _finding_from_state(s: list[Any]) -> Finding:
    detector, step, value, severity, message, baseline, score = s
    return Finding(
        detector, int(step), float(value), severity, message, _float_or_none(baseline), _float_or_none(score)
    )
