"""The agent's own cost, measured on the training thread, as a share of the step time."""

from __future__ import annotations

from dataclasses import dataclass


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
