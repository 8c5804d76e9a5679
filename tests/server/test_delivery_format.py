"""What sinks receive, built without a network: the signed webhook request and the Slack message."""

from __future__ import annotations

import json
import math
from typing import Any

from trimtab import webhooks
from trimtab.server.alerts.messages import format_number, sample_alert, slack_message, webhook_body, webhook_request


def _alert(**changes: Any) -> dict[str, Any]:
    return {**sample_alert(3, "http://trimtab.example"), "project": "llm", "rule": "loss-spike", **changes}


def test_webhook_request_is_signed_over_timestamp_and_body() -> None:
    body = webhook_body("firing", 12, _alert(value=math.inf, baseline=-math.inf))
    request = webhook_request("s3cret-s3cret-s3cret", body, "12", 1_700_000_000)
    headers = request.headers
    assert headers["X-Trimtab-Timestamp"] == "1700000000" and headers["X-Trimtab-Delivery"] == "12"
    assert webhooks.verify("s3cret-s3cret-s3cret", "1700000000", headers["X-Trimtab-Signature"], body, now=1.7e9)
    parsed = json.loads(body)
    assert parsed["event"] == "firing" and parsed["delivery_id"] == 12
    assert (parsed["alert"]["value"], parsed["alert"]["baseline"]) == ("Infinity", "-Infinity")


def test_numbers_read_well() -> None:
    assert [format_number(v) for v in (None, "NaN", math.nan, -math.inf, 7, 0.000123456, 1234567.0, True)] == [
        "-",
        "NaN",
        "NaN",
        "-Infinity",
        "7",
        "0.0001235",
        "1.235e+06",
        "True",
    ]


def test_slack_escapes_and_clips_what_users_control() -> None:
    message = slack_message(
        "firing", _alert(message="x <!channel> & " + "y" * 5000, key="attn/<max>", run_name="<!here>")
    )
    blocks = json.dumps(message["blocks"])
    assert "<!channel>" not in blocks and "&lt;!channel&gt; &amp;" in blocks
    assert "<!here>" not in message["text"] and "&lt;!here&gt;" in message["text"]
    assert "attn/&lt;max&gt;" in blocks
    assert all(len(b["text"]["text"]) <= 3000 for b in message["blocks"] if "text" in b)
    assert len(message["text"]) <= 3000


def test_slack_headlines_by_event() -> None:
    assert slack_message("firing", _alert(severity="warning"))["text"].startswith(":warning: WARNING loss-spike")
    escalated = slack_message("escalated", _alert(severity="critical"))["text"]
    assert escalated.startswith(":rotating_light: ESCALATED to CRITICAL loss-spike")
    resolved = slack_message("resolved", _alert(status="resolved"))
    assert resolved["text"] == ":white_check_mark: RESOLVED loss-spike: llm / test message (#0): loss is back to normal"
    assert "What to try" not in json.dumps(resolved["blocks"])
    ranked = slack_message("firing", _alert(rank=3, run_name="big", run_id=9))["text"]
    assert "llm / big (#9) rank 3: loss = NaN at step 0" in ranked
