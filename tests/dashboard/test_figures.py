"""The dashboard's figures and page logic as pure functions: no server, no browser."""

from __future__ import annotations

import math
import random

import pytest

from trimtab.dashboard import markers
from trimtab.dashboard.client import Histogram, Series
from trimtab.dashboard.figures import Panel, compare_figure, describe, nonfinite_points, overview_figure
from trimtab.dashboard.heatmaps import distribution_heatmap, histogram_bars, layer_heatmap, regrid, step_grid
from trimtab.dashboard.live import extension
from trimtab.dashboard.pages.control import request_for
from trimtab.dashboard.pages.overview import choose_panels


def series(key: str, values: list[float], start: int = 0) -> Series:
    return Series(key=key, steps=list(range(start, start + len(values))), values=values)


def by_name(fig: object, name: str) -> object:
    found = [t for t in fig.data if t.name == name]  # type: ignore[attr-defined]
    assert len(found) == 1, f"{name!r}: {[t.name for t in fig.data]}"  # type: ignore[attr-defined]
    return found[0]


def test_every_nonfinite_point_gets_a_marker_on_the_last_finite_value() -> None:
    s = series("loss", [math.nan, 2.0, 1.5, math.nan, math.inf, 1.0, -math.inf])
    nf = nonfinite_points(s)
    assert nf.steps == [0, 3, 4, 6]
    assert nf.kinds == ["NaN", "NaN", "+Inf", "-Inf"]
    assert nf.y == [2.0, 1.5, 1.5, 1.0]  # the first one, before any finite value: the first finite after


def test_an_all_nan_series_still_shows_its_markers() -> None:
    nf = nonfinite_points(series("loss", [math.nan, math.nan]))
    assert nf.steps == [0, 1] and nf.y == [0.0, 0.0]


def test_overview_draws_nan_markers_and_a_strip_of_events_alerts_and_commands() -> None:
    loss = series("loss", [3.0, 2.0, math.nan, 1.0])
    lr = series("lr/group0", [0.1, 0.1, 0.1, 0.05])
    found = [
        markers.Marker(2, markers.NONFINITE, "nan", "<b>non-finite</b>", "critical"),
        markers.Marker(2, markers.ALERT, "nonfinite-loss", "alert", "critical"),
        markers.Marker(3, markers.COMMAND, "reduce_lr", "applied at step 3", "info"),
    ]
    panels = [Panel("loss", [loss]), Panel("learning rate", [lr])]
    fig = overview_figure(panels, found)
    nan = by_name(fig, "loss NaN/Inf")
    assert list(nan.x) == [2] and list(nan.y) == [2.0] and list(nan.customdata) == ["NaN"]  # type: ignore[attr-defined]
    assert list(by_name(fig, "lr/group0 NaN/Inf").x) == []  # type: ignore[attr-defined]
    assert list(by_name(fig, markers.ALERT).x) == [2]  # type: ignore[attr-defined]
    assert list(by_name(fig, markers.COMMAND).hovertext) == ["applied at step 3"]  # type: ignore[attr-defined]
    # The recorded trace indices are the line traces, as a live update extends them.
    assert [fig.data[i].name for p in panels for i in p.traces] == ["loss", "lr/group0"]
    # One shared step axis: the strip's and every chart's x axis follow the bottom one.
    assert [fig.layout[a].matches for a in ("xaxis", "xaxis2", "xaxis3")] == ["x3", "x3", None]
    # Vertical lines at the alert and the command, through both charts.
    assert sorted(shape.x0 for shape in fig.layout.shapes) == [2, 2, 3, 3]


def test_a_spike_survives_the_servers_downsampling_into_the_figure() -> None:
    rng = random.Random(1)
    values = [1.0 + 0.01 * rng.random() for _ in range(200_000)]
    values[123_457] = 1e6
    values[77_777] = math.nan
    # What the API sends for a 200,000-point range at max_points=500: each 800-step bucket's
    # minimum and maximum, and the first NaN, at their real steps.
    keep = {77_777}
    for start in range(0, len(values), 800):
        bucket = [i for i in range(start, start + 800) if not math.isnan(values[i])]
        keep.update((min(bucket, key=values.__getitem__), max(bucket, key=values.__getitem__)))
    steps = sorted(keep)
    view = Series("loss", steps, [values[i] for i in steps], len(values), downsampled=True, bucket_steps=800)
    fig = overview_figure([Panel("loss", [view])], [])
    line = by_name(fig, "loss")
    assert 1e6 in list(line.y)  # type: ignore[attr-defined]
    assert 123_457 in list(line.x)  # type: ignore[attr-defined]
    assert list(by_name(fig, "loss NaN/Inf").x) == [77_777]  # type: ignore[attr-defined]
    assert f"{len(keep):,} of 200,000 points" in describe(view)


def test_the_layer_heatmap_keeps_each_cells_largest_value_and_marks_nan_cells() -> None:
    flat = [1.0] * 10_000
    spiky = flat.copy()
    spiky[5_001] = 500.0
    broken = flat.copy()
    broken[9_000] = math.nan
    grid = step_grid([series("grad_norm/a", flat), series("grad_norm/b", spiky), series("grad_norm/c", broken)], 100)
    assert grid.width == 100 and len(grid.columns) == 100
    assert max(v for v in grid.z[1] if v is not None) == 500.0  # the spike is the cell's value
    assert grid.z[1][50] == 500.0
    assert grid.nonfinite == [(2, 90, "NaN")] and grid.z[2][90] is None  # blank, and marked
    fig = layer_heatmap([series("grad_norm/a", flat), series("grad_norm/c", broken)], prefix="grad_norm/", title="g")
    assert list(fig.data[0].y) == ["a", "c"]
    assert list(fig.data[1].customdata) == ["NaN"]


def test_grid_columns_are_never_narrower_than_the_apis_buckets() -> None:
    # A downsampled view: one point per 16-step bucket, anywhere in it.
    view = Series("grad_norm/w", [s * 16 + (s * 7) % 16 for s in range(100)], [1.0] * 100, bucket_steps=16)
    grid = step_grid([view], 300)
    assert grid.width == 16 and all(v is not None for v in grid.z[0])


def test_columns_without_points_are_dropped_from_the_step_grid() -> None:
    sparse = Series("update_ratio/w", [0, 100, 400], [1e-3, 2e-3, 3e-3])
    grid = step_grid([sparse, Series("update_ratio/b", [0, 100, 400], [1.0, 2.0, 3.0])], 300)
    assert grid.width == 134  # three columns at most: a row has three points
    assert grid.columns == [0, 268] and grid.z == [[2e-3, 3e-3], [2.0, 3.0]]


def test_histograms_regrid_onto_shared_edges_with_exact_totals_and_visible_nonfinite_counts() -> None:
    hists = [
        Histogram(step=0, edges=[-1.0, 0.0, 1.0], counts=[3, 5], nan=0, pinf=0, ninf=0),
        Histogram(step=10, edges=[-4.0, -2.0, 0.0, 2.0, 4.0], counts=[1, 2, 3, 4], nan=7, pinf=1, ninf=0),
    ]
    g = regrid(hists, bins=16)
    assert g.edges[0] == -4.0 and g.edges[-1] == 4.0
    assert [sum(row[j] for row in g.counts) for j in range(2)] == [8, 10]
    assert g.nonfinite == [0, 8]
    fig = distribution_heatmap(hists, "weights/w", selected=10)
    assert list(fig.data[1].x) == [10] and list(fig.data[1].customdata) == [8]
    bars = histogram_bars(hists[1], "weights/w")
    assert "NaN 7, +Inf 1, -Inf 0" in bars.layout.title.text


def test_keys_are_escaped_where_plotly_renders_html() -> None:
    evil = '<a href="https://evil.example">x</a>'
    fig = overview_figure([Panel("loss", [series(evil, [1.0, math.nan])])], [])
    for t in fig.data[3:]:
        assert "<a " not in t.name and "<a " not in (t.hovertemplate or "")
    heat = layer_heatmap([series(f"grad_norm/{evil}", [1.0])], prefix="grad_norm/", title="g")
    assert list(heat.data[0].y) == ["&lt;a href=&quot;https://evil.example&quot;&gt;x&lt;/a&gt;"]
    hist = Histogram(step=1, edges=[0.0, 1.0], counts=[1], nan=0, pinf=0, ninf=0)
    assert "<a " not in histogram_bars(hist, evil).layout.title.text
    assert "<a " not in distribution_heatmap([hist], evil).layout.title.text
    assert "<a " not in compare_figure([(evil, series("loss", [1.0]))], evil).data[0].name


def test_compare_overlays_one_key_of_several_runs() -> None:
    fig = compare_figure([("1: a", series("loss", [1.0, math.nan])), ("2: b", series("loss", [2.0, 1.0]))], "loss")
    assert [t.name for t in fig.data] == ["1: a", "1: a NaN/Inf", "2: b", "2: b NaN/Inf"]
    assert list(fig.data[1].x) == [1]


def test_extension_appends_to_the_right_traces_with_gaps_for_nan() -> None:
    assert extension({}) is None
    assert extension({3: series("loss", [])}) is None
    data, indices = extension({5: series("lr", [0.1], 7), 3: series("loss", [1.0, math.nan], 7)})  # type: ignore[misc]
    assert indices == [3, 5]
    assert data == {"x": [[7, 8], [7]], "y": [[1.0, None], [0.1]]}


def test_panels_follow_the_keys_the_run_has() -> None:
    keys = [
        {"key": k, "kind": "scalar"}
        for k in ("loss", "lr/group1", "lr/group0", "grad_norm/total", "perf/samples_per_s", "perf/step_time_s")
    ] + [{"key": "weights/w", "kind": "histogram"}]
    assert choose_panels(keys) == [
        ("loss", ["loss"], False),
        ("learning rate", ["lr/group0", "lr/group1"], False),
        ("gradient norm (total, before clipping)", ["grad_norm/total"], True),
        ("throughput (samples/s)", ["perf/samples_per_s"], False),
    ]
    assert choose_panels([]) == []


def test_control_forms_build_commands_or_say_what_is_wrong() -> None:
    assert request_for("ctl-ask-reduce", 0.5, None, None, None, None) == {"kind": "reduce_lr", "args": {"factor": 0.5}}
    assert request_for("ctl-ask-skip", None, 3, None, None, None) == {"kind": "skip_batches", "args": {"n": 3}}
    assert request_for("ctl-ask-rollback", None, None, None, None, None) == {"kind": "rollback", "args": {}}
    assert request_for("ctl-ask-rollback", None, None, 120, None, None)["args"] == {"to_step": 120}
    custom = request_for("ctl-ask-custom", None, None, None, " checkpoint ", '{"tag": "x"}')
    assert custom == {"kind": "checkpoint", "args": {"tag": "x"}}
    for bad, message in (
        (("ctl-ask-reduce", 1.5, None, None, None, None), "between 0 and 1"),
        (("ctl-ask-reduce", None, None, None, None, None), "between 0 and 1"),
        (("ctl-ask-skip", None, 0, None, None, None), "from 1 to 100000"),
        (("ctl-ask-rollback", None, None, -1, None, None), ">= 0"),
        (("ctl-ask-custom", None, None, None, "", None), "needs a kind"),
        (("ctl-ask-custom", None, None, None, "k", "{nope"), "not valid JSON"),
        (("ctl-ask-custom", None, None, None, "k", "[1]"), "JSON object"),
    ):
        with pytest.raises(ValueError, match=message):
            request_for(*bad)  # type: ignore[arg-type]


def test_command_status_in_words() -> None:
    assert markers.status_text({"status": "applied", "step": 812}) == "applied at step 812"
    assert markers.status_text({"status": "pending"}) == "pending"
    assert markers.status_text({"status": "rejected", "detail": {"reason": "no snapshot"}}) == "rejected: no snapshot"
    assert markers.status_text({"status": "expired", "detail": None}) == "expired"


def test_markers_from_api_rows() -> None:
    events = [
        {"id": 1, "kind": "nonfinite", "step": 40, "rank": 0, "data": {"source": "forward", "module": "blocks.3.attn"}},
        {"id": 2, "kind": "command", "step": 50, "rank": 0, "data": {}},
        {"id": 3, "kind": "nonfinite", "step": None, "rank": 0, "data": {}},
    ]
    nf = markers.from_events(events)
    assert [(m.step, m.row) for m in nf] == [(40, markers.NONFINITE)]
    assert "blocks.3.attn" in nf[0].label and "forward" in nf[0].detail
    commands: list[dict[str, object]] = [
        {"kind": "reduce_lr", "args": {"factor": 0.5}, "status": "applied", "step": 90, "created_by": "me"},
        {"kind": "skip_batches", "args": {"n": 2}, "status": "pending", "step": None, "created_by": "me"},
    ]
    assert [(m.step, m.label) for m in markers.from_commands(commands)] == [(90, "reduce_lr factor=0.5")]
    alert = {
        "rule": "loss-spike",
        "severity": "warning",
        "status": "firing",
        "message": "loss jumped " * 20,
        "first_step": 7,
        "last_step": 9,
    }
    (m,) = markers.from_alerts([alert])
    assert m.step == 7 and m.severity == "warning"
    assert "jumped<br>loss" in m.detail or "jumped loss<br>" in m.detail  # long messages wrap
    assert "&lt;br&gt;" not in m.detail
