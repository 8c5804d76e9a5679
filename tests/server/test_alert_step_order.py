"""Rules see each (run, rank)'s points in step order across keys, whatever the batching: the
same series fed in batches of 1, 20 and 500 steps gives the same alerts at the same steps,
and a confirmed spike is named at the step of the spike (real SQLite and PostgreSQL, the
shipped rules, the ingest writer and the engine wired as the app wires them)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import pytest

from tests.server.test_alert_engine import Rig, add_sink, deliveries
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store

STEPS = 600
CORRUPT_AT = 250  # a corrupted batch: the loss and the gradient spike; the loss stays high a few steps
DIVERGE_FROM = 420  # the loss climbs and stays up
NAN_AT = 560


def series(seed: int, corrupt: bool = True) -> dict[str, list[tuple[int, float]]]:
    """A run's loss and total gradient norm with the three faults above (without the
    corrupted batch's loss when not ``corrupt``), keyed as the agent names them."""
    rng = random.Random(seed)
    loss: list[tuple[int, float]] = []
    grad: list[tuple[int, float]] = []
    for step in range(STEPS):
        value = 2.0 * math.exp(-step / 400) + 1.0 + rng.gauss(0, 0.01)
        norm = 1.0 + rng.gauss(0, 0.03)
        if corrupt and CORRUPT_AT <= step < CORRUPT_AT + 8:
            value += 12.0 * 0.7 ** (step - CORRUPT_AT)  # the damage fades over 8 steps
        if step == CORRUPT_AT:
            norm *= 40
        if step >= DIVERGE_FROM:
            value *= 1.0 + 0.02 * (step - DIVERGE_FROM)
        if step == NAN_AT:
            value = math.nan
        loss.append((step, value))
        grad.append((step, norm))
    return {"grad_norm/total": grad, "loss": loss}


def fed_in_batches(
    rig: Rig, uid: str, data: dict[str, list[tuple[int, float]]], size: int, keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The alerts of a run whose points came in batches of ``size`` steps, with the keys in
    that order in each batch."""
    run_id = rig.run(uid)
    for start in range(0, STEPS, size):
        rig.send(run_id, {key: data[key][start : start + size] for key in keys})
    fields = ("first_step", "rule", "key", "severity", "last_step", "count", "status")
    return sorted(({k: a[k] for k in fields} for a in rig.alerts(run_id)), key=lambda a: (a["first_step"], a["rule"]))


@pytest.fixture
def store(migrated_db: str) -> Iterator[Store]:
    engine = make_engine(migrated_db)
    yield Store(engine)
    engine.dispose()


def test_the_same_series_in_batches_of_1_20_and_500_steps_gives_the_same_alerts(store: Store) -> None:
    rig = Rig(store)
    try:
        data = series(seed=3)
        got = {
            (size, keys): fed_in_batches(rig, f"batched-{size}-{keys[0]}", data, size, keys)
            for size in (1, 20, 500)
            for keys in (("loss", "grad_norm/total"), ("grad_norm/total", "loss"))
        }
    finally:
        rig.stop()
    reference = got[(1, ("loss", "grad_norm/total"))]
    for (size, keys), alerts in got.items():
        assert alerts == reference, (size, keys)
    first = {(a["rule"], a["key"]): a["first_step"] for a in reference}
    assert first[("loss-spike", "loss")] == CORRUPT_AT  # the spike's own step, not a later finding
    assert DIVERGE_FROM < first[("loss-divergence", "loss")] < NAN_AT
    assert first[("nonfinite-loss", "loss")] == NAN_AT


def test_a_jump_that_stays_up_is_not_told_to_skip_a_batch(store: Store) -> None:
    """The remedy fits the evidence: one corrupted batch (the loss spikes and falls back) says
    skip it; a jump that stays up (corrupted weights) says roll back, skipping cannot help."""
    rig = Rig(store)
    try:
        data = series(seed=4)
        stays_up = {
            "grad_norm/total": data["grad_norm/total"],
            "loss": [(s, v + (12.0 if s >= CORRUPT_AT else 0.0)) for s, v in series(seed=4, corrupt=False)["loss"]],
        }
        remedies = {}
        for name, run_data in (("one-batch", data), ("stays-up", stays_up)):
            run_id = rig.run(name)
            for start in range(0, DIVERGE_FROM, 20):
                rig.send(run_id, {key: points[start : start + 20] for key, points in run_data.items()})
            (spike,) = [a for a in rig.alerts(run_id) if a["rule"] == "loss-spike"]
            remedies[name] = (spike["first_step"], spike["count"], spike["remedy"])
    finally:
        rig.stop()
    assert remedies["one-batch"][0] == CORRUPT_AT and remedies["one-batch"][1] < 8
    assert remedies["one-batch"][2].startswith("Skip the offending batch")
    assert remedies["stays-up"][0] == CORRUPT_AT and remedies["stays-up"][1] >= 8
    assert "roll back" in remedies["stays-up"][2] and "skipping a batch will not help" in remedies["stays-up"][2]


def test_a_level_shift_is_an_info_alert_nobody_is_paged_for(store: Store) -> None:
    """The loss steps up and stays while the gradient norm barely moves (new data): the shipped
    loss rules open info alerts that say nothing is wrong, and no notification is queued. A
    real spike during it (the gradient norm jumps 40x) escalates the info alert, which is then
    announced as firing, with the rule's hint (the jump one: the loss has stayed up)."""
    add_sink(store)
    rig = Rig(store)
    try:
        rng = random.Random(5)
        loss = [(s, 2.0 * (1.6 if s >= 300 else 1.0) + rng.gauss(0, 0.01)) for s in range(600)]
        grad = [(s, (1.3 if 300 <= s < 315 else 1.0) + rng.gauss(0, 0.03)) for s in range(600)]
        run_id = rig.run("shift")
        for start in range(0, 340, 20):
            rig.send(run_id, {"loss": loss[start : start + 20], "grad_norm/total": grad[start : start + 20]})
        shift = {a["rule"]: a for a in rig.alerts(run_id)}
        assert set(shift) == {"loss-spike"}  # the divergence waits 50 steps for its confirmation
        assert shift["loss-spike"]["severity"] == "info" and not shift["loss-spike"]["notified"]
        assert shift["loss-spike"]["first_step"] == 300 and shift["loss-spike"]["remedy"].startswith(
            "Nothing looks wrong"
        )
        assert deliveries(store) == []
        spike = {"loss": [(340, 40.0)], "grad_norm/total": [(340, 40.0)]}
        rig.send(run_id, spike)
        rig.send(run_id, {"loss": loss[341:], "grad_norm/total": grad[341:]})
        (escalated,) = [a for a in rig.alerts(run_id) if a["rule"] == "loss-spike"]
        (rise,) = [a for a in rig.alerts(run_id) if a["rule"] == "loss-divergence"]
        assert rise["severity"] == "info" and not rise["notified"] and 300 < rise["first_step"] < 340
        assert escalated["severity"] == "critical" and escalated["notified"] is True
        assert not escalated["remedy"].startswith("Nothing looks wrong")  # the rule's own hint again
        pages = [(a, e, p["severity"]) for a, e, p in deliveries(store) if p["rule"] == "loss-spike"]
        assert pages[0] == (escalated["id"], "firing", "critical")  # then "resolved" once it is quiet
        assert all(p["severity"] != "info" for _, _, p in deliveries(store))
    finally:
        rig.stop()
