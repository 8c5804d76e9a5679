"""The shipped ``attention-logits`` rule on what the watcher records: it pages when a GPT's
attention logits grow past 1000 (no qk-norm, its q/k projections blown up step by step, as an
unstable run does) and stays silent on the healthy twin."""

from __future__ import annotations

import torch

from tests.agent.test_attention import CausalSelfAttention, TinyGPT
from tests.agent.test_watch import Recorder, watch
from trimtab.detectors import DEFAULT_RULES, RuleEvaluator

STEPS, GROW_FROM, GROW_UNTIL, SAMPLE_EVERY = 30, 10, 22, 2


class Script:
    """A tiny GPT (no qk-norm) trained with AdamW on random tokens; with ``grow`` the script
    multiplies every layer's q and k projection rows by 1.5 before each step from GROW_FROM
    to GROW_UNTIL (logits x 2.25 per step)."""

    def __init__(self, grow: bool) -> None:
        torch.manual_seed(0)
        self.grow = grow
        self.model = TinyGPT("nanogpt")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.data = torch.randint(0, 50, (STEPS, 4, 16))

    def forward_backward(self, step: int) -> torch.Tensor:
        if self.grow and GROW_FROM <= step < GROW_UNTIL:
            with torch.no_grad():
                for layer in range(2):
                    attn = self.model.attention(layer)
                    assert isinstance(attn, CausalSelfAttention)
                    attn.c_attn.weight[: 2 * 32] *= 1.5
        x = self.data[step]
        logits = self.model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), x[:, 1:].reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    def update(self) -> None:
        self.opt.step()
        self.opt.zero_grad()


def train(grow: bool) -> Recorder:
    script = Script(grow)
    watcher, sink = watch(script.model, script.opt, sample_every=SAMPLE_EVERY, overhead_budget=None)
    for step in range(STEPS):
        watcher.step(script.forward_backward(step), step, None, None)
        script.update()
    watcher.close()
    return sink


def findings(sink: Recorder) -> list[tuple[int, str]]:
    """(step, key) of each finding of the shipped rule, fed every point in step order."""
    (rule,) = [r for r in DEFAULT_RULES if r.name == "attention-logits"]
    evaluators: dict[str, RuleEvaluator] = {}
    found = []
    for step in sorted(sink.scalars):
        for key, value in sink.scalars[step].items():
            if rule.matches(key):
                evaluator = evaluators.setdefault(key, RuleEvaluator(rule, key))
                finding = evaluator.update(key, step, value)
                if finding is not None:
                    assert finding.severity == "critical"
                    found.append((step, key))
    return found


def test_the_attention_logits_rule_fires_when_logits_grow_and_not_on_the_healthy_twin() -> None:
    healthy, grown = train(grow=False), train(grow=True)
    sampled = range(0, STEPS, SAMPLE_EVERY)
    keys = ["attn/h.0.attn/max_logit", "attn/h.1.attn/max_logit"]
    for sink in (healthy, grown):
        assert all(sorted(k for k in sink.scalars[s] if k.startswith("attn/")) == keys for s in sampled)
    assert max(healthy.scalars[s][k] for s in sampled for k in keys) < 100
    assert findings(healthy) == []

    found = findings(grown)
    first_over = min(s for s in sampled for k in keys if grown.scalars[s][k] > 1000)
    assert first_over > GROW_FROM and found and found[0][0] == first_over
    assert {key for _, key in found} == set(keys)  # every layer's q/k grew
