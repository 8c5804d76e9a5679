"""The agent's own cost, measured on the training thread, as a share of the step time, and
the governor that samples less when it is over budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_SAMPLE_EVERY = 1 << 20


@dataclass
class Window:
    agent: float = 0.0  # seconds the agent spent on the training thread
    wall: float = 0.0  # seconds between step boundaries, agent time included
    steps: int = 0

    def pct(self) -> float | None:
        """Agent time over the time the step would take without it, in percent."""
        work = self.wall - self.agent
        return None if self.steps == 0 or work <= 0 else 100.0 * self.agent / work


class OverheadMeter:
    """Adds up agent time per step; the window closes every ``report_every`` steps."""

    def __init__(self, report_every: int) -> None:
        self.report_every = report_every
        self.current = 0.0  # agent seconds in the step in progress
        self.total = Window()
        self.plain = Window()  # steps that sampled nothing: the every-step cost alone
        self.reports = 0

    def add(self, seconds: float) -> None:
        self.current += seconds

    def close_step(self, wall: float | None, sampled: bool) -> None:
        """The previous step ended after ``wall`` seconds (None for the first step: not counted)."""
        agent, self.current = self.current, 0.0
        if wall is None:
            return
        for window in (self.total,) if sampled else (self.total, self.plain):
            window.agent += agent
            window.wall += wall
            window.steps += 1

    def due(self) -> bool:
        return self.total.steps >= self.report_every

    def take(self) -> tuple[float | None, float | None]:
        """(overall %, every-step-only %) of the closed window, and start a new one."""
        result = self.total.pct(), self.plain.pct()
        self.total, self.plain = Window(), Window()
        self.reports += 1
        return result


@dataclass(frozen=True)
class Change:
    """What the governor decided: the new cadence, and what to tell the user."""

    sample_every: int
    per_param: bool
    action: str
    budget_pct: float

    def event(self, overall: float, plain: float | None) -> dict[str, Any]:
        """The ``overhead_governor`` event's data."""
        return {
            "overhead_pct": overall,
            "every_step_overhead_pct": plain,
            "budget_pct": self.budget_pct,
            "action": self.action,
            "sample_every": self.sample_every,
            "per_param_grad_norms": self.per_param,
        }


class Governor:
    """Past its budget the agent samples less: first per-parameter gradient norms go to
    sampled steps when the every-step work alone is over budget, else ``sample_every``
    doubles. The first window holds warm-up costs: judged from the second report on."""

    def __init__(self, budget: float | None) -> None:
        self.budget = budget  # a fraction of the step time; None: never act
        self._said_none_left = False

    def decide(
        self, overall: float, plain: float | None, reports: int, per_param: bool, sample_every: int
    ) -> Change | None:
        if self.budget is None:
            return None  # governor off: the cadence stays as configured
        budget = 100.0 * self.budget
        if reports < 2 or overall <= budget:
            return None
        if plain is not None and plain > budget:
            if per_param:
                action = (
                    "per-parameter gradient norms are now logged only on sampled steps (the total stays every step)"
                )
                return Change(sample_every, False, action, budget)
            if self._said_none_left:
                return None
            self._said_none_left = True  # sampling less would not help: say so once
            action = (
                f"nothing left to cut: the work done on every step (loss, total gradient norm, NaN check) "
                f"alone costs {plain:.2f}% of steps this short, and sampling less cannot lower it; "
                "the cadence stays (overhead_budget=None silences this)"
            )
            return Change(sample_every, per_param, action, budget)
        if sample_every < MAX_SAMPLE_EVERY:
            return Change(2 * sample_every, per_param, f"sampled statistics now every {2 * sample_every} steps", budget)
        return None
