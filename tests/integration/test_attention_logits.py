"""attn/<module>/max_logit end to end: a real agent streams a nanoGPT-style model's attention
logits to a real server, whose alert engine pages with the shipped ``attention-logits`` rule
when they grow past 1000, and not for the healthy twin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trimtab
from tests.agent.test_attention_rule import SAMPLE_EVERY, STEPS, Script
from tests.helpers import ServerProcess, run_by_name, wait_until


def stream(server: ServerProcess, tmp_path: Path, name: str, grow: bool) -> int:
    run = trimtab.init(server=server.url, project="attn", name=name, spool_dir=str(tmp_path / name))
    script = Script(grow)
    run.watch(script.model, script.opt, sample_every=SAMPLE_EVERY, overhead_budget=None)
    for step in range(STEPS):
        run.step(script.forward_backward(step))
        script.update()
    assert run.finish(timeout=60) is True
    run_id: int = run_by_name(server, name)["id"]
    return run_id


def alerts(server: ServerProcess, run_id: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = server.get(f"/api/v1/runs/{run_id}/alerts?order=oldest&limit=1000")
    return got


def test_growing_attention_logits_page_and_the_healthy_twin_does_not(server: ServerProcess, tmp_path: Path) -> None:
    healthy = stream(server, tmp_path, "healthy", grow=False)
    grown = stream(server, tmp_path, "grown", grow=True)
    keys = {"attn/h.0.attn/max_logit", "attn/h.1.attn/max_logit"}
    for run_id in (healthy, grown):
        stored = {k["key"]: k["count"] for k in server.get(f"/api/v1/runs/{run_id}/keys")}
        assert {k: stored.get(k) for k in keys} == {k: STEPS // SAMPLE_EVERY for k in keys}

    # The alert engine runs on its own thread, in ingest order: once the grown run's end has
    # resolved its alerts, every point of both runs was judged.
    def ended() -> bool:
        return any(a["resolve_reason"] == "run_finished" for a in alerts(server, grown))

    wait_until(ended, 60, "the grown run's end to resolve its alerts")
    server_alerts = alerts(server, grown)
    paged = sorted((a["key"], a["first_step"]) for a in server_alerts if a["rule"] == "attention-logits")
    series = server.get(f"/api/v1/runs/{grown}/scalars?key=attn/h.0.attn/max_logit")
    first_over = min(s for s, v in zip(series["steps"], series["values"], strict=True) if v > 1000)
    assert paged and paged[0] == ("attn/h.0.attn/max_logit", first_over), server_alerts
    assert {a["severity"] for a in server_alerts if a["rule"] == "attention-logits"} == {"critical"}
    assert not [a for a in alerts(server, healthy) if a["rule"] == "attention-logits"]
