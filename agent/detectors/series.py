"""Single-series detectors: pure, stateful and serialisable, so the server (on the ingest
stream) and the agent (on the training thread) run the same code.

A detector sees one series, one value at a time: ``update(step, value)`` returns a
:class:`Finding` when the value is an instability, else None. ``state()`` is a JSON-safe
dict and ``restore(state)`` rebuilds an equal detector, so a server restart resumes where
it stopped. No torch, no numpy: plain Python, a few microseconds per update.

Defaults are documented on each class. Rules (``rules.py``) put a detector on a key.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

INFO, WARNING, CRITICAL = "info", "warning", "critical"
# Severity order: an info finding is an annotation (never notified, never acted on); warning
# and critical page.
SEVERITY_RANK = {INFO: 0, WARNING: 1, CRITICAL: 2}


@dataclass(frozen=True)
class Finding:
    detector: str
    step: int
    value: float
    severity: str
    message: str
    baseline: float | None = None
    score: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


class Detector(ABC):
    kind: ClassVar[str]
    _registry: ClassVar[dict[str, type[Detector]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Detector._registry[cls.kind] = cls

    @abstractmethod
    def update(self, step: int, value: float) -> Finding | None:
        """Feed the next value of the series (steps increase); a finding when it is unstable."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything needed to resume, JSON-safe (only finite numbers are kept)."""

    @staticmethod
    def kinds() -> dict[str, type[Detector]]:
        """Every detector class by its ``kind``."""
        return dict(Detector._registry)

    @staticmethod
    def restore(state: dict[str, Any]) -> Detector:
        """The detector ``state()`` described; ValueError when the state is not one."""
        cls = Detector._registry.get(state.get("kind", ""))
        if cls is None:
            raise ValueError(f"unknown detector kind {state.get('kind')!r}")
        try:
            return cls._from_state(state)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed {cls.kind} state: {type(exc).__name__}: {exc}") from None

    @classmethod
    @abstractmethod
    def _from_state(cls, state: dict[str, Any]) -> Detector: ...


class NonFinite(Detector):
    """A NaN or ±Inf value (loss, gradient norm, any key): critical, on every such step.
    Deduplication into one alert per streak is the alert engine's job."""

    kind = "nonfinite"

    def update(self, step: int, value: float) -> Finding | None:
        if math.isfinite(value):
            return None
        return Finding(self.kind, step, value, CRITICAL, f"value is {value} at step {step}")

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Detector:
        return cls()


class Threshold(Detector):
    """``value <op> limit`` for any key, e.g. a user-logged ``attn/max_logit > 1e3``,
    ``loss_scale < 1`` or dead units (``act/<module>/zero_frac > 0.9``), on ``patience`` (1)
    values in a row. Non-finite values are NonFinite's business: they never match and they
    end a streak."""

    kind = "threshold"
    OPS: ClassVar[dict[str, Any]] = {
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
    }

    def __init__(self, op: str, limit: float, severity: str = WARNING, patience: int = 1) -> None:
        if op not in self.OPS:
            raise ValueError(f"threshold op must be one of {sorted(self.OPS)}, got {op!r}")
        if not math.isfinite(limit):
            raise ValueError(f"threshold limit must be a finite number, got {limit!r}")
        _check_severity(severity)
        if patience < 1:
            raise ValueError(f"threshold patience must be >= 1, got {patience}")
        self.op, self.limit, self.severity, self.patience = op, float(limit), severity, patience
        self._streak = 0

    def update(self, step: int, value: float) -> Finding | None:
        if not math.isfinite(value) or not self.OPS[self.op](value, self.limit):
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < self.patience:
            return None
        return Finding(self.kind, step, value, self.severity, f"{value:.6g} {self.op} {self.limit:.6g}", self.limit)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "op": self.op,
            "limit": self.limit,
            "severity": self.severity,
            "patience": self.patience,
            "streak": self._streak,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Detector:
        d = cls(state["op"], state["limit"], state.get("severity", WARNING), state.get("patience", 1))
        d._streak = state.get("streak", 0)
        return d


class Band(Detector):
    """Outside ``[low, high]`` for ``patience`` (3) values in a row. For ratios that should
    stay within orders of magnitude: the first/last-layer gradient-norm ratio (vanishing or
    exploding gradients across depth, e.g. 1e-3 to 1e3) or an update ratio ‖ΔW‖/‖W‖ (e.g.
    1e-6 to 1e-1). ``low`` and ``high`` must be finite with ``low < high``."""

    kind = "band"

    def __init__(self, low: float, high: float, patience: int = 3, severity: str = WARNING) -> None:
        if not (math.isfinite(low) and math.isfinite(high) and low < high) or patience < 1:
            raise ValueError("band: need finite low < high and patience >= 1")
        _check_severity(severity)
        self.low, self.high, self.patience, self.severity = float(low), float(high), patience, severity
        self._streak = 0

    def update(self, step: int, value: float) -> Finding | None:
        if not math.isfinite(value) or self.low <= value <= self.high:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < self.patience:
            return None
        side = "below" if value < self.low else "above"
        bound = self.low if value < self.low else self.high
        message = f"{value:.3g} is {side} {bound:.3g} for {self._streak} values in a row"
        return Finding(self.kind, step, value, self.severity, message, bound)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "low": self.low,
            "high": self.high,
            "patience": self.patience,
            "severity": self.severity,
            "streak": self._streak,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Detector:
        d = cls(state["low"], state["high"], state["patience"], state["severity"])
        d._streak = state["streak"]
        return d


def _check_severity(severity: str) -> None:
    if severity not in (WARNING, CRITICAL):
        raise ValueError(f"severity must be {WARNING!r} or {CRITICAL!r}, got {severity!r}")


class OverflowRate(Detector):
    """Mixed-precision loss-scale collapse, on the ``amp_overflow`` series (logged as 1 on the
    steps a GradScaler skipped): ``streak`` (3) overflow steps in a row, or more than ``rate``
    (1 %) of the last ``window`` (1000) steps, once ``window`` steps have passed."""

    kind = "overflow_rate"

    def __init__(self, streak: int = 3, rate: float = 0.01, window: int = 1000) -> None:
        if streak < 1 or window < 1 or not 0 < rate < 1:
            raise ValueError("overflow_rate: streak and window must be >= 1 and rate in (0, 1)")
        self.streak, self.rate, self.window = streak, rate, window
        self._steps: deque[int] = deque()  # overflow steps within the window
        self._run = 0
        self._last: int | None = None
        self._first: int | None = None

    def update(self, step: int, value: float) -> Finding | None:
        if self._first is None:
            self._first = step
        if not value:  # a 0 (logged explicitly): not an overflow
            return None
        self._run = self._run + 1 if self._last is not None and step == self._last + 1 else 1
        self._last = step
        self._steps.append(step)
        while self._steps and self._steps[0] <= step - self.window:
            self._steps.popleft()
        if self._run >= self.streak:
            return Finding(
                self.kind, step, value, CRITICAL, f"{self._run} overflow steps in a row: the loss scale is collapsing"
            )
        seen = min(self.window, step - self._first + 1)
        if seen >= self.window and len(self._steps) > self.rate * self.window:
            share = len(self._steps) / self.window
            return Finding(
                self.kind, step, share, WARNING, f"{share:.1%} of the last {self.window} steps overflowed", self.rate
            )
        return None

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "streak": self.streak,
            "rate": self.rate,
            "window": self.window,
            "steps": list(self._steps),
            "run": self._run,
            "last": self._last,
            "first": self._first,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Detector:
        d = cls(state["streak"], state["rate"], state["window"])
        d._steps = deque(state["steps"])
        d._run, d._last, d._first = state["run"], state["last"], state["first"]
        return d


class RobustSpike(Detector):
    """A value far above the recent typical one: robust z = (x - median) / scale over the last
    ``window`` (200) accepted values, where scale = max(1.4826 MAD, ``rel_floor`` x |median|).
    Fires above ``z`` (8), after ``warmup`` (50) values. The value under test and flagged
    values never enter the baseline, so a spike cannot hide the next one and a run of bad
    steps keeps firing instead of becoming the new normal. Non-finite values are skipped
    (NonFinite reports them). A series that is constant through warm-up has a scale of
    ``rel_floor`` x |median| (or 1e-12 at zero), so it is meant for loss and gradient norms,
    not for values that sit exactly still. ``min_ratio`` (0: off) also asks the value to be at
    least that many times the median: on a series as steady as a gradient norm a small rise is
    many deviations, and ``min_ratio`` says how large a jump counts at all."""

    kind = "robust_spike"

    def __init__(
        self, z: float = 8.0, window: int = 200, warmup: int = 50, rel_floor: float = 0.01, min_ratio: float = 0.0
    ) -> None:
        if window < 3 or not 3 <= warmup <= window or z <= 0 or rel_floor < 0 or min_ratio < 0:
            raise ValueError(
                "robust_spike: need window >= 3, 3 <= warmup <= window, z > 0, rel_floor >= 0, min_ratio >= 0"
            )
        self.z, self.window, self.warmup, self.rel_floor, self.min_ratio = z, window, warmup, rel_floor, min_ratio
        self._recent: deque[float] = deque()  # accepted values, oldest first
        self._sorted: list[float] = []

    def baseline(self) -> tuple[float, float] | None:
        """(median, scale) of the accepted values, or None during warm-up."""
        n = len(self._sorted)
        if n < self.warmup:
            return None
        median = _median(self._sorted)
        scale = max(1.4826 * _mad(self._sorted, median), self.rel_floor * abs(median), 1e-12)
        return median, scale

    def update(self, step: int, value: float) -> Finding | None:
        if not math.isfinite(value):
            return None
        base = self.baseline()
        if base is not None:
            median, scale = base
            score = (value - median) / scale
            if score > self.z and (self.min_ratio <= 0 or value >= self.min_ratio * median > 0):
                return Finding(
                    self.kind,
                    step,
                    value,
                    WARNING,
                    f"{value:.6g} is {score:.1f} robust deviations above the recent median {median:.6g}",
                    median,
                    score,
                )
        self._accept(value)
        return None

    def accept(self, value: float) -> None:
        """Take a flagged value into the baseline after all (a rule whose confirmation never
        came: the value is a new level, not a spike)."""
        if math.isfinite(value):
            self._accept(value)

    def _accept(self, value: float) -> None:
        self._recent.append(value)
        insort(self._sorted, value)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect_left(self._sorted, old)]

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "z": self.z,
            "window": self.window,
            "warmup": self.warmup,
            "rel_floor": self.rel_floor,
            "min_ratio": self.min_ratio,
            "recent": list(self._recent),
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Detector:
        d = cls(state["z"], state["window"], state["warmup"], state["rel_floor"], state.get("min_ratio", 0.0))
        for value in state["recent"]:
            d._accept(float(value))
        return d


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _mad(ordered: list[float], median: float) -> float:
    """Median absolute deviation of sorted values around their median, in O(log n): the
    deviations are two sorted runs (walking left and right from the median), and the median
    of their union is found by selection, with no sort and no copy."""
    split = bisect_left(ordered, median)
    a, b = split, len(ordered) - split  # a left deviations (median - v), b right (v - median)

    def left(i: int) -> float:
        return median - ordered[split - 1 - i]

    def right(j: int) -> float:
        return ordered[split + j] - median

    def kth(k: int) -> float:  # the k-th smallest deviation, 0-based
        lo, hi = max(0, k + 1 - b), min(a, k + 1)
        while True:
            i = (lo + hi) // 2  # take i from the left run, j from the right
            j = k + 1 - i
            if i < a and j > 0 and right(j - 1) > left(i):
                lo = i + 1
            elif i > 0 and j < b and left(i - 1) > right(j):
                hi = i - 1
            else:
                return max(left(i - 1) if i > 0 else -math.inf, right(j - 1) if j > 0 else -math.inf)

    n = len(ordered)
    return kth(n // 2) if n % 2 else (kth(n // 2 - 1) + kth(n // 2)) / 2


class GrossMagnitude(Detector):
    """A value ``factor`` (10) times the early maximum: the reference is the largest of the
    first ``reference`` (100) finite values after the first ``skip`` (10), when the loss
    still falls fast. Blunt but nearly free of false alarms (Megatron-LM's check)."""

    kind = "gross_magnitude"

    def __init__(self, factor: float = 10.0, reference: int = 100, skip: int = 10) -> None:
        if factor <= 1 or reference < 1 or skip < 0:
            raise ValueError("gross_magnitude: need factor > 1, reference >= 1, skip >= 0")
        self.factor, self.reference, self.skip = factor, reference, skip
        self._seen = 0
        self._max: float | None = None

    def update(self, step: int, value: float) -> Finding | None:
        if not math.isfinite(value):
            return None
        self._seen += 1
        if self._seen <= self.skip:
            return None
        if self._seen <= self.skip + self.reference:
            self._max = value if self._max is None else max(self._max, value)
            return None
        assert self._max is not None
        limit = self.factor * abs(self._max)
        if abs(value) <= limit:
            return None
        message = f"{value:.6g} is over {self.factor:g}x the early maximum {self._max:.6g}"
        return Finding(self.kind, step, value, CRITICAL, message, self._max, abs(value) / max(abs(self._max), 1e-300))

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "factor": self.factor,
            "reference": self.reference,
            "skip": self.skip,
            "seen": self._seen,
            "max": self._max,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Detector:
        d = cls(state["factor"], state["reference"], state["skip"])
        d._seen, d._max = state["seen"], state["max"]
        return d


class Divergence(Detector):
    """A sustained rise: the median of the last ``short`` (20) values over the median of the
    ``long`` (200) values before them exceeds ``ratio`` (1.3) for ``patience`` (10) updates
    in a row. Slower than a spike detector by design; it catches the slow blow-up a spike
    detector adapts to. Meant for positive series (loss, gradient norm): while the earlier
    median is not positive it stays silent."""

    kind = "divergence"

    def __init__(self, ratio: float = 1.3, short: int = 20, long: int = 200, patience: int = 10) -> None:
        if ratio <= 1 or short < 1 or long < short or patience < 1:
            raise ValueError("divergence: need ratio > 1, 1 <= short <= long, patience >= 1")
        self.ratio, self.short, self.long, self.patience = ratio, short, long, patience
        self._values: deque[float] = deque()  # the last short + long values, oldest first
        self._recent: list[float] = []  # the last `short` of them, sorted
        self._before: list[float] = []  # the `long` before those, sorted
        self._over = 0

    def _push(self, value: float) -> None:
        self._values.append(value)
        insort(self._recent, value)
        if len(self._values) > self.short:  # the value leaving the short window joins the long one
            moved = self._values[-self.short - 1]
            del self._recent[bisect_left(self._recent, moved)]
            insort(self._before, moved)
        if len(self._values) > self.short + self.long:
            old = self._values.popleft()
            del self._before[bisect_left(self._before, old)]

    def update(self, step: int, value: float) -> Finding | None:
        if not math.isfinite(value):
            return None
        self._push(value)
        if len(self._values) < self.short + self.long:
            return None
        recent = _median(self._recent)
        before = _median(self._before)
        if before <= 0 or recent / before <= self.ratio:
            self._over = 0
            return None
        self._over += 1
        if self._over < self.patience:
            return None
        message = (
            f"median {recent:.6g} over the last {self.short} steps is {recent / before:.2f}x the {before:.6g} before"
        )
        return Finding(self.kind, step, value, WARNING, message, before, recent / before)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ratio": self.ratio,
            "short": self.short,
            "long": self.long,
            "patience": self.patience,
            "values": list(self._values),
            "over": self._over,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Detector:
        d = cls(state["ratio"], state["short"], state["long"], state["patience"])
        for value in state["values"]:
            d._push(float(value))
        d._over = state["over"]
        return d
