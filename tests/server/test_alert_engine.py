"""The alert engine on a real database: the ingest writer hands it committed batches, it
runs the effective rules and writes alerts and outbox rows (real SQLite and PostgreSQL)."""

from __future__ import annotations

import math
import random
import time
from array import array
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete, insert, select

from tests.helpers import wait_until
from trimtab.detectors import parse_rule
from trimtab.protocol import Batch, Event, Hello, RunRef, ScalarSeries
from trimtab.server.alerts import store as alert_store
from trimtab.server.alerts.engine import AlertEngine
from trimtab.server.alerts.rules import RuleStore
from trimtab.server.alerts.store import AlertFilter
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.db.tables import alert_deliveries, detector_states, runs, sinks
from trimtab.server.ingest import IngestWriter

BASE_URL = "http://trimtab.test:8000"
LOGITS = {"name": "logits", "key": "attn/max_logit", "detector": "threshold", "params": {"op": ">", "limit": 100.0}}


class Rig:
    """A store, an ingest writer and an alert engine wired as the app wires them."""

    def __init__(self, store: Store, **engine_options: Any) -> None:
        self.store = store
        self.engine = AlertEngine(store, BASE_URL, **engine_options)
        self.writer = IngestWriter(store, on_commit=self.engine.submit)
        self.seqs: dict[tuple[int, int], int] = {}
        self.engine.start()
        self.writer.start()

    def stop(self) -> None:
        self.writer.stop()
        self.engine.stop()

    def run(self, uid: str, project: str = "eng", rank: int = 0) -> int:
        run_id, _ = self.store.open_run(Hello(RunRef(uid, project, uid), 1, "0", "host", 1, rank, 2, {}))
        return run_id

    def send(self, run_id: int, series: dict[str, list[tuple[int, float]]], rank: int = 0, **kw: Any) -> None:
        seq = self.seqs[(run_id, rank)] = self.seqs.get((run_id, rank), 0) + 1
        self.writer.submit(run_id, rank, batch(seq, series, **kw)).result(30)
        assert self.engine.flush()

    def alerts(self, run_id: int) -> list[dict[str, Any]]:
        with self.store.transaction() as conn:
            return alert_store.list_alerts(conn, AlertFilter(run_id=run_id, oldest_first=True, limit=1000), BASE_URL)


def batch(seq: int, series: dict[str, list[tuple[int, float]]], events: list[Event] | None = None) -> Batch:
    scalars = [
        ScalarSeries(
            key,
            array("q", [s for s, _ in points]),
            array("d", [time.time()] * len(points)),
            array("d", [v for _, v in points]),
        )
        for key, points in series.items()
    ]
    return Batch(seq, scalars, [], events or [])


@pytest.fixture
def store(migrated_db: str) -> Iterator[Store]:
    engine = make_engine(migrated_db)
    yield Store(engine)
    engine.dispose()


@pytest.fixture
def rig(store: Store) -> Iterator[Rig]:
    r = Rig(store)
    yield r
    r.stop()


def add_sink(store: Store, project_id: int | None = None) -> int:
    with store.transaction() as conn:
        return int(
            conn.execute(
                insert(sinks)
                .values(
                    kind="webhook",
                    name="hook",
                    url="http://127.0.0.1:9/",
                    secret="s",
                    project_id=project_id,
                    enabled=True,
                    created_at=time.time(),
                )
                .returning(sinks.c.id)
            ).scalar_one()
        )


def deliveries(store: Store) -> list[tuple[int, str, dict[str, Any]]]:
    with store.transaction() as conn:
        rows = conn.execute(
            select(alert_deliveries.c.alert_id, alert_deliveries.c.event, alert_deliveries.c.payload).order_by(
                alert_deliveries.c.id
            )
        ).all()
    return [(r.alert_id, r.event, r.payload) for r in rows]


def steady(start: int, stop: int, value: float = 1.0) -> list[tuple[int, float]]:
    return [(s, value) for s in range(start, stop)]


def test_nonfinite_loss_fires_folds_resolves_and_notifies_each_once(rig: Rig, store: Store) -> None:
    add_sink(store)
    run_id = rig.run("nan")
    rig.send(run_id, {"loss": [*steady(0, 10), (10, math.nan), (11, math.inf), *steady(12, 50)]})
    (alert,) = rig.alerts(run_id)
    assert alert["rule"] == "nonfinite-loss" and alert["status"] == "firing" and alert["severity"] == "critical"
    assert (alert["first_step"], alert["last_step"], alert["count"]) == (10, 11, 2)
    assert alert["value"] == "Infinity"  # the latest finding's
    assert alert["remedy"] and alert["url"] == f"{BASE_URL}/runs/{run_id}" and alert["run_name"] == "nan"
    assert alert["notified"] is True and alert["rank"] == 0 and alert["project"] == "eng"
    # 100 steps without a finding resolve it: at step 111, not before
    rig.send(run_id, {"loss": steady(50, 111)})
    assert rig.alerts(run_id)[0]["status"] == "firing"
    rig.send(run_id, {"loss": steady(111, 112)})
    (alert,) = rig.alerts(run_id)
    assert alert["status"] == "resolved" and alert["resolve_reason"] == "quiet" and alert["resolved_at"]
    sent = deliveries(store)
    assert [(a, e) for a, e, _ in sent] == [(alert["id"], "firing"), (alert["id"], "resolved")]
    firing = sent[0][2]
    assert firing["value"] == "NaN" and firing["status"] == "firing" and firing["count"] == 1  # as it was then
    assert {"project", "run_id", "run_name", "run_uid", "rule", "key", "baseline", "remedy", "url"} <= set(firing)

    # A NaN again within the rule's cooldown (300 s): a new alert, silent
    rig.send(run_id, {"loss": [(120, math.nan)]})
    second = rig.alerts(run_id)[1]
    assert second["status"] == "firing" and second["notified"] is False and second["first_step"] == 120
    assert len(deliveries(store)) == 2
    rig.send(run_id, {"loss": steady(121, 221)})
    assert rig.alerts(run_id)[1]["status"] == "resolved"
    assert len(deliveries(store)) == 2  # a silent alert's resolution is silent too

    # With no cooldown, the next one notifies again
    RuleStore(store).write(
        "eng",
        None,
        parse_rule({"name": "nonfinite-loss", "key": "loss", "detector": "nonfinite", "cooldown_s": 0}),
        replace=True,
    )
    rig.engine.rules_changed(_project_id(store, run_id))
    rig.send(run_id, {"loss": [(230, math.nan)]})
    third = rig.alerts(run_id)[2]
    assert third["notified"] is True
    assert [e for _, e, _ in deliveries(store)] == ["firing", "resolved", "firing"]


def _project_id(store: Store, run_id: int) -> int:
    with store.transaction() as conn:
        return RuleStore.run_scope(conn, run_id).project_id


def test_no_sink_no_deliveries_but_the_alert_is_there(rig: Rig, store: Store) -> None:
    run_id = rig.run("quiet")
    rig.send(run_id, {"loss": [(0, math.nan)]})
    assert len(rig.alerts(run_id)) == 1 and deliveries(store) == []


def test_a_sink_of_another_project_hears_nothing(rig: Rig, store: Store) -> None:
    other = rig.run("elsewhere", project="other")
    add_sink(store, _project_id(store, other))
    run_id = rig.run("here")
    rig.send(run_id, {"loss": [(0, math.nan)]})
    assert len(rig.alerts(run_id)) == 1 and deliveries(store) == []


def test_escalation_is_a_new_notification_and_rule_removal_resolves(rig: Rig, store: Store) -> None:
    add_sink(store)
    run_id = rig.run("attn")
    project_id = _project_id(store, run_id)
    rules = RuleStore(store)
    body = {"name": "logits", "key": "attn/max_logit", "detector": "threshold", "params": {"op": ">", "limit": 100.0}}
    rules.write("eng", None, parse_rule({**body, "severity": "warning"}), replace=False)
    rig.engine.rules_changed(project_id)
    rig.send(run_id, {"attn/max_logit": [(0, 10.0), (1, 150.0)]})
    (alert,) = rig.alerts(run_id)
    assert alert["severity"] == "warning" and alert["rule"] == "logits"
    rules.write("eng", None, parse_rule({**body, "severity": "critical"}), replace=True)
    rig.engine.rules_changed(project_id)
    rig.send(run_id, {"attn/max_logit": [(2, 170.0), (3, 180.0)]})
    (alert,) = rig.alerts(run_id)
    assert alert["severity"] == "critical" and alert["count"] == 3 and alert["last_step"] == 3
    assert [e for _, e, _ in deliveries(store)] == ["firing", "escalated"]
    assert deliveries(store)[1][2]["severity"] == "critical"

    rules.delete("eng", None, "logits")
    rig.engine.rules_changed(project_id)
    assert rig.engine.flush()
    (alert,) = rig.alerts(run_id)
    assert alert["status"] == "resolved" and alert["resolve_reason"] == "rule_removed"
    assert [e for _, e, _ in deliveries(store)] == ["firing", "escalated", "resolved"]
    rig.send(run_id, {"attn/max_logit": [(4, 500.0)]})  # over 100, under the default rule's 1000
    assert len(rig.alerts(run_id)) == 1  # the rule is gone


def test_a_run_override_switches_a_default_off_for_that_run_only(rig: Rig, store: Store) -> None:
    off, on = rig.run("off"), rig.run("on")
    RuleStore(store).write(
        None,
        off,
        parse_rule({"name": "nonfinite-loss", "key": "loss", "detector": "nonfinite", "enabled": False}),
        replace=False,
    )
    rig.engine.rules_changed(_project_id(store, off))
    for run_id in (off, on):
        rig.send(run_id, {"loss": [(0, math.nan)]})
    assert rig.alerts(off) == [] and len(rig.alerts(on)) == 1


def test_run_finishing_resolves_its_alerts(rig: Rig, store: Store) -> None:
    add_sink(store)
    run_id = rig.run("ends")
    rig.send(run_id, {"loss": [(0, math.nan)]})
    rig.engine.run_finished(run_id)
    assert rig.engine.flush()
    (alert,) = rig.alerts(run_id)
    assert alert["status"] == "resolved" and alert["resolve_reason"] == "run_finished"
    assert [e for _, e, _ in deliveries(store)] == ["firing", "resolved"]


def test_ranks_alert_apart_and_a_storm_notifies_once(rig: Rig, store: Store) -> None:
    add_sink(store)
    run_id = rig.run("ddp")
    for rank in (0, 1):
        rig.send(run_id, {"loss": [(0, 1.0), (1, math.nan)]}, rank=rank)
    alerts = rig.alerts(run_id)
    assert [(a["rank"], a["notified"]) for a in alerts] == [(0, True), (1, False)]
    assert [e for _, e, _ in deliveries(store)] == ["firing"]


def test_glob_rule_gets_one_alert_per_matched_key(rig: Rig) -> None:
    run_id = rig.run("dead")
    dead = [(0, 0.5), (1, 0.99), (2, 0.99)]  # dead-units: > 0.95 twice in a row
    rig.send(run_id, {"act/l1/zero_frac": dead, "act/l2/zero_frac": dead, "act/l3/zero_frac": steady(0, 3, 0.1)})
    assert sorted((a["rule"], a["key"]) for a in rig.alerts(run_id)) == [
        ("dead-units", "act/l1/zero_frac"),
        ("dead-units", "act/l2/zero_frac"),
    ]


def test_nan_provenance_from_the_event_lands_in_the_alert_and_its_first_page(rig: Rig, store: Store) -> None:
    add_sink(store)
    run_id = rig.run("prov")
    where = {"module": "blocks.3.attn", "parameter": "blocks.3.attn.qkv.weight"}
    rig.send(run_id, {"loss": [(0, 1.0), (1, math.nan)]}, events=[Event("nonfinite", 1, time.time(), "error", where)])
    (alert,) = rig.alerts(run_id)
    assert alert["data"]["provenance"] == where
    [(_, event, payload)] = deliveries(store)
    assert event == "firing" and payload["data"]["provenance"] == where


def test_a_sparse_key_that_keeps_firing_keeps_one_alert(rig: Rig, store: Store) -> None:
    """run.watch logs act/*/zero_frac every 100 steps: each sample with a finding folds into
    the alert, however far it is from the last (resolve_after_steps is 100 too)."""
    add_sink(store)
    run_id = rig.run("sparse")
    for step in range(0, 1100, 100):  # dead-units: > 0.95 on two samples in a row, from step 100 on
        rig.send(run_id, {"act/l1/zero_frac": [(step, 0.99)], "loss": [(step, 1.0)]})
    rig.send(run_id, {"act/l1/zero_frac": [(s, 0.99) for s in range(1100, 1600, 100)]})
    (alert,) = rig.alerts(run_id)
    assert (alert["rule"], alert["status"], alert["first_step"], alert["last_step"], alert["count"]) == (
        "dead-units",
        "firing",
        100,
        1500,
        15,
    )
    assert [e for _, e, _ in deliveries(store)] == ["firing"]
    rig.send(run_id, {"act/l1/zero_frac": [(1600, 0.5)]})  # a sample without a finding, 100 steps on
    (alert,) = rig.alerts(run_id)
    assert (alert["status"], alert["resolve_reason"], alert["count"]) == ("resolved", "quiet", 15)
    assert [e for _, e, _ in deliveries(store)] == ["firing", "resolved"]


def training_series(seed: int, n: int = 1000) -> dict[str, list[tuple[int, float]]]:
    """Loss and grad norm with noise, a joint spike at 300 (confirmed loss spike, gross
    magnitude), NaN losses at 600, 650-655 and at the last step (an alert still firing at the
    end), and attention logits over the default limit at 800-804."""
    rng = random.Random(seed)
    loss, grad, logit = [], [], []
    for s in range(n):
        lv = 2.0 * math.exp(-s / 400) + 0.5 + rng.gauss(0, 0.01)
        gv = 1.0 + rng.gauss(0, 0.02)
        if s == 300:
            lv, gv = 60.0, 80.0
        if s in (600, n - 1) or 650 <= s <= 655:
            lv = math.nan
        loss.append((s, lv))
        grad.append((s, gv))
        logit.append((s, 2000.0 if 800 <= s < 805 else 10.0))
    return {"loss": loss, "grad_norm/total": grad, "attn/max_logit": logit}


def _batches(series: dict[str, list[tuple[int, float]]], size: int = 25) -> list[dict[str, list[tuple[int, float]]]]:
    n = len(next(iter(series.values())))
    return [{k: v[i : i + size] for k, v in series.items()} for i in range(0, n, size)]


def comparable(alerts: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = (
        "rank",
        "rule",
        "key",
        "detector",
        "severity",
        "status",
        "resolve_reason",
        "first_step",
        "last_step",
        "count",
        "value",
        "baseline",
        "notified",
        "message",
    )
    rows = [tuple(a[k] for k in keys) for a in alerts]
    return sorted(rows, key=lambda r: (r[0], r[1], r[2], r[7]))  # alerts opened in one batch: any id order


def test_findings_survive_an_engine_restart_and_batches_it_never_saw(store: Store) -> None:
    series = _batches(training_series(7))
    first = Rig(store)
    reference = first.run("reference")
    for b in series:
        first.send(reference, b)
    expected = comparable(first.alerts(reference))
    assert {a[1] for a in expected} >= {"loss-spike", "loss-gross", "nonfinite-loss", "attention-logits"}

    restarted = first.run("restarted")
    for b in series[:14]:
        first.send(restarted, b)
    first.stop()  # a clean stop saves every detector state
    # Batches committed while no engine ran (say the process died before evaluating them)
    blind = IngestWriter(store)
    blind.start()
    for seq, b in enumerate(series[14:25], start=15):
        blind.submit(restarted, 0, batch(seq, b)).result(30)
    blind.stop()
    second = Rig(store)
    second.seqs[(restarted, 0)] = 25
    try:
        for b in series[25:]:
            second.send(restarted, b)
        assert comparable(second.alerts(restarted)) == expected
    finally:
        second.stop()


def test_saved_state_names_the_last_step_seen_of_each_key(store: Store) -> None:
    rig = Rig(store)
    run_id = rig.run("state")
    rig.send(run_id, {"loss": [(0, math.nan), (1, math.inf), (2, 1.0)], "grad_norm/total": [(0, math.nan)]})
    rig.stop()
    with store.transaction() as conn:
        rows = conn.execute(select(detector_states).where(detector_states.c.run_id == run_id)).all()
    by_rule = {(r.rule_name, r.key): r for r in rows}
    assert by_rule[("nonfinite-loss", "loss")].step == 2
    assert by_rule[("nonfinite-loss", "loss")].state["seen"] == {"loss": 2}
    assert by_rule[("loss-spike", "loss")].state["seen"] == {"loss": 2, "grad_norm/total": 0}


def test_saved_states_keep_non_finite_floats(store: Store) -> None:
    """PostgreSQL's json type refuses NaN and Infinity: they are stored as strings and read back as floats."""
    run_id = _bare_run(store, "nan-state")
    state = {"evaluator": {"max": math.inf, "recent": [1.0, math.nan, -math.inf], "deep": {"x": [math.inf]}}}
    row = {"run_id": run_id, "rank": 0, "rule_name": "r", "key": "loss", "state": state, "step": 7}
    with store.transaction() as conn:
        alert_store.save_states(conn, [row], store.sqlite)
    with store.transaction() as conn:
        loaded = alert_store.load_state(conn, run_id, 0, "r", "loss")
    assert loaded is not None
    ev = loaded["evaluator"]
    assert ev["max"] == math.inf and ev["recent"][0] == 1.0 and math.isnan(ev["recent"][1])
    assert ev["recent"][2] == -math.inf and ev["deep"] == {"x": [math.inf]}


def _bare_run(store: Store, uid: str) -> int:
    run_id, _ = store.open_run(Hello(RunRef(uid, "eng", uid), 1, "0", "host", 1, 0, 2, {}))
    return run_id


def test_states_are_saved_run_by_run(store: Store) -> None:
    """A run whose states cannot be saved (deleted meanwhile) does not keep another's from being saved."""
    rig = Rig(store)
    try:
        gone, kept = rig.run("gone"), rig.run("kept")
        for run_id in (gone, kept):
            rig.send(run_id, {"loss": steady(0, 5)})
        with store.transaction() as conn:
            conn.execute(delete(runs).where(runs.c.id == gone))
        rig.send(kept, {"loss": steady(5, 9)})
    finally:
        rig.stop()  # saves every state
    with store.transaction() as conn:
        saved = conn.execute(
            select(detector_states.c.run_id, detector_states.c.step).where(
                detector_states.c.rule_name == "nonfinite-loss"
            )
        ).all()
    assert [(r.run_id, r.step) for r in saved] == [(kept, 8)]


def test_a_full_queue_falls_back_to_replaying_from_the_database(store: Store) -> None:
    series = _batches(training_series(11))
    reference = Rig(store)
    try:
        ref = reference.run("ref")
        for b in series:
            reference.send(ref, b)
        expected = comparable(reference.alerts(ref))
    finally:
        reference.stop()
    squeezed = Rig(store, queue_max_points=1)  # every batch overflows: each becomes a catch-up
    try:
        run_id = squeezed.run("squeezed")
        for b in series:
            squeezed.send(run_id, b)
        assert squeezed.engine.stats.catch_ups > 0
        assert comparable(squeezed.alerts(run_id)) == expected
    finally:
        squeezed.stop()


def test_a_rule_added_to_a_running_run_also_looks_at_what_it_logged_before(rig: Rig, store: Store) -> None:
    run_id = rig.run("late-rule")
    rig.send(run_id, {"attn/max_logit": [(0, 10.0), (1, 150.0), (2, 10.0)]})
    assert rig.alerts(run_id) == []
    RuleStore(store).write("eng", None, parse_rule({**LOGITS, "resolve_after_steps": 1000}), replace=False)
    rig.engine.rules_changed(_project_id(store, run_id))
    rig.send(run_id, {"attn/max_logit": [(3, 10.0)]})
    (alert,) = rig.alerts(run_id)
    assert (alert["rule"], alert["first_step"], alert["value"]) == ("logits", 1, 150.0)


def test_rules_written_elsewhere_apply_after_the_refresh_interval(store: Store) -> None:
    rig = Rig(store, rules_ttl_s=0.0)  # as if another replica wrote the rule: no rules_changed here
    try:
        run_id = rig.run("replica")
        rig.send(run_id, {"attn/max_logit": [(0, 10.0)]})
        RuleStore(store).write("eng", None, parse_rule(LOGITS), replace=False)
        rig.send(run_id, {"attn/max_logit": [(1, 150.0)]})
        assert [a["rule"] for a in rig.alerts(run_id)] == ["logits"]
    finally:
        rig.stop()


def test_dirty_detector_state_is_saved_periodically(store: Store) -> None:
    rig = Rig(store, state_interval_s=0.05)
    try:
        run_id = rig.run("periodic")
        rig.send(run_id, {"loss": steady(0, 10)})

        def saved_step() -> int | None:
            with store.transaction() as conn:
                return conn.execute(
                    select(detector_states.c.step).where(
                        detector_states.c.run_id == run_id, detector_states.c.rule_name == "nonfinite-loss"
                    )
                ).scalar()

        wait_until(lambda: saved_step() == 9, 30, "the first save")
        rig.send(run_id, {"loss": steady(10, 20)})
        wait_until(lambda: saved_step() == 19, 30, "the next save")  # while running, no stop needed
    finally:
        rig.stop()
