"""End to end: a real agent logs a NaN loss, and with no rule configured (the shipped default)
a real webhook receiver gets a signed request and a Slack-style receiver a readable message."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import trimtab
from tests.helpers import ServerProcess, wait_until
from tests.server.receiver import receiver
from trimtab import webhooks


def _post(server: ServerProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


def test_nan_loss_reaches_webhook_and_slack_receivers(server: ServerProcess, tmp_path: Path) -> None:
    with receiver() as hook, receiver() as slack:
        secret = _post(server, "/api/v1/sinks", {"kind": "webhook", "url": hook.url})["secret"]
        _post(server, "/api/v1/sinks", {"kind": "slack", "url": slack.url, "project": "e2e"})
        _post(server, "/api/v1/sinks", {"kind": "slack", "url": slack.url, "project": "someone-else"})
        run = trimtab.init(
            server=server.url, project="e2e", name="nan-run", spool_dir=str(tmp_path), replay_orphans=False
        )
        for step in range(5):
            run.log({"loss": 2.0 - step * 0.1}, step=step)
        run.log({"loss": math.nan}, step=5)
        [got] = hook.wait_for(1)
        [message] = slack.wait_for(1)
        assert run.finish(timeout=30) is True
        # Finishing the run resolves the alert: both sinks hear that too, after the firing.
        resolved = hook.wait_for(2)[1].json()
        slack.wait_for(2)
    assert webhooks.verify(secret, got.headers["x-trimtab-timestamp"], got.headers["x-trimtab-signature"], got.body)
    body = got.json()
    assert body["event"] == "firing" and str(body["delivery_id"]) == got.headers["x-trimtab-delivery"]
    alert = body["alert"]
    assert (alert["rule"], alert["key"], alert["value"], alert["last_step"]) == ("nonfinite-loss", "loss", "NaN", 5)
    assert alert["project"] == "e2e" and alert["run_name"] == "nan-run" and alert["run_id"] == run.id
    assert alert["remedy"] and alert["url"] == f"{server.url}/runs/{run.id}"
    assert resolved["event"] == "resolved" and resolved["alert"]["status"] == "resolved"
    text = message.json()["text"]
    assert "CRITICAL nonfinite-loss" in text and "e2e / nan-run" in text and "loss = NaN at step 5" in text
    assert len(slack.all()) == 2  # the sink of another project got nothing

    def delivered() -> list[int]:
        return [s["deliveries"]["delivered"] for s in server.get("/api/v1/sinks")]

    wait_until(lambda: delivered() == [2, 2, 0], 30, "the deliveries recorded")
