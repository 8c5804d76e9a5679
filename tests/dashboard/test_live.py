"""The overview's live-update decisions (``trimtab.dashboard.live``), without a browser."""

from __future__ import annotations

import math
from typing import Any

from trimtab.dashboard.client import Series
from trimtab.dashboard.live import REASK_S, VIEW_POINTS, Fetch, Tick, appended, decide, redraw_once

T0 = 1_000.0


def drawn(**extra: Any) -> dict[str, Any]:
    """A figure as a redraw left it: two traces, loss at step 10 and lr at step 9."""
    return {
        "run_id": 1,
        "rev": 3,
        "sig": "m1",
        "traces": {"loss": 0, "lr/group0": 1},
        "last": {"loss": 10, "lr/group0": 9},
        "range": None,
        **extra,
    }


KEYS = ["loss", "lr/group0"]


def test_before_the_first_drawing_a_redraw_is_asked_once_then_again_after_a_while() -> None:
    first = decide({"run_id": 1}, None, 10, "", [], T0)
    assert (
        isinstance(first, Tick) and first.rebuild == f"first@{T0}" and first.seen == {"asked": "first", "asked_at": T0}
    )
    assert decide({"run_id": 1}, first.seen, 10, "", [], T0 + 1) == Tick()  # asked, and it may be running
    again = decide({"run_id": 1}, first.seen, 10, "", [], T0 + REASK_S + 0.1)
    assert isinstance(again, Tick) and again.rebuild is not None


def test_a_new_figure_starts_from_what_it_holds_and_reads_only_newer_points() -> None:
    step = decide(
        drawn(), {"rev": 2, "last": {"loss": 3}, "appended": 50, "asked": "m0", "asked_at": 5.0}, 12, "m1", KEYS, T0
    )
    assert isinstance(step, Fetch)
    assert step.seen == {"asked": "m0", "asked_at": 5.0, "rev": 3, "last": {"loss": 10, "lr/group0": 9}, "appended": 0}
    assert step.since == {"loss": (0, 10), "lr/group0": (1, 9)}
    caught_up = decide(drawn(), step.seen, 10, "m1", KEYS, T0)
    assert isinstance(caught_up, Fetch) and caught_up.since == {"lr/group0": (1, 9)}  # loss holds step 10 already


def test_new_markers_or_new_charts_ask_for_a_redraw() -> None:
    markers = decide(drawn(), None, 12, "m2", KEYS, T0)
    assert isinstance(markers, Tick) and markers.rebuild == f"m2@{T0}" and markers.seen is not None
    charts = decide(drawn(), None, 12, "m1", [*KEYS, "grad_norm/total"], T0)
    assert (
        isinstance(charts, Tick)
        and charts.rebuild is not None
        and "keys:grad_norm/total,loss,lr/group0" in charts.rebuild
    )


def test_zoomed_or_empty_runs_do_nothing_and_an_outgrown_figure_is_redrawn() -> None:
    assert decide(drawn(range=[0, 5]), None, 12, "m1", KEYS, T0) == Tick()
    assert decide(drawn(), None, None, "m1", KEYS, T0) == Tick()
    seen = {"rev": 3, "last": {"loss": 10, "lr/group0": 9}, "appended": VIEW_POINTS + 1}
    grown = decide(drawn(), seen, 12, "m1", KEYS, T0)
    assert isinstance(grown, Tick) and grown.rebuild == f"grown@{T0}"


def test_appended_points_extend_the_traces_and_move_what_is_held() -> None:
    seen = {"rev": 3, "last": {"loss": 10, "lr/group0": 9}, "appended": 5}
    tick = appended(seen, {0: Series("loss", [11, 12], [0.5, 0.4])}, T0)
    assert tick.extend == ({"x": [[11, 12]], "y": [[0.5, 0.4]]}, [0])
    assert tick.seen == {"rev": 3, "last": {"loss": 12, "lr/group0": 9}, "appended": 7} and tick.rebuild is None
    assert appended(seen, {}, T0) == Tick()


def test_a_nan_goes_in_as_a_gap_and_asks_for_its_marker_at_most_every_few_seconds() -> None:
    seen = {"rev": 3, "last": {"loss": 10}, "appended": 0}
    first = appended(seen, {0: Series("loss", [11], [math.nan])}, T0)
    assert first.extend == ({"x": [[11]], "y": [[None]]}, [0]) and first.rebuild == f"nonfinite@{T0}"
    assert first.seen is not None and first.seen["nonfinite_pending"] == 0
    burst = appended(first.seen, {0: Series("loss", [12], [math.inf])}, T0 + 1)
    assert burst.rebuild is None and burst.seen is not None and burst.seen["nonfinite_pending"] is True
    quiet = appended(burst.seen, {}, T0 + REASK_S + 1)  # no new NaN, but the last one still needs its marker
    assert quiet.rebuild is not None and quiet.extend is None and quiet.seen is not None


def test_redraw_once_is_per_reason() -> None:
    asked = redraw_once({}, "a", T0)
    assert asked.seen is not None and redraw_once(asked.seen, "a", T0 + 1) == Tick()
    assert redraw_once(asked.seen, "b", T0 + 1).rebuild == f"b@{T0 + 1}"
