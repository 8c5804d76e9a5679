"""The watcher's numbers, checked against torch computing the same things directly.

The watcher writes through a small recording sink here (the Run's sink only queues what it
gets for the sender); tests/integration/test_instrumentation.py covers the way to a server.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trimtab.watch import Watcher, WatchOptions


class Recorder:
    rank = 0

    def __init__(self) -> None:
        self.scalars: dict[int, dict[str, float]] = {}
        self.histograms: dict[tuple[str, int], tuple[list[int], float, float]] = {}
        self.events: list[tuple[str, int | None, dict[str, Any], str]] = []
        self.warnings: dict[str, str] = {}

    def emit_scalars(self, step: int, wall: float, record: dict[str, float]) -> None:
        self.scalars.setdefault(step, {}).update(record)

    def emit_histogram(self, key: str, step: int, wall: float, counts: list[int], lo: float, width: float) -> None:
        self.histograms[(key, step)] = (counts, lo, width)

    def emit_event(self, kind: str, step: int | None, data: dict[str, Any], level: str = "info") -> None:
        self.events.append((kind, step, data, level))

    def warn_once(self, topic: str, message: str) -> None:
        self.warnings.setdefault(topic, message)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def watch(model: nn.Module, opt: torch.optim.Optimizer | None = None, **kw: Any) -> tuple[Watcher, Recorder]:
    sink = Recorder()
    return Watcher(sink, model, opt, None, kw.pop("scaler", None), WatchOptions(**kw)), sink


def train(model: nn.Module, opt: torch.optim.Optimizer, watcher: Watcher, steps: int, **step_kw: Any) -> list[Any]:
    """Plain loop; returns, per step, (loss, per-parameter grads) as the watcher saw them."""
    seen = []
    for step in range(steps):
        x = torch.randn(4, 6)
        loss = model(x).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        seen.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        watcher.step(loss, step, step_kw.get("batch_size"), step_kw.get("tokens"))
        opt.step()
        opt.zero_grad()
    watcher.close()
    return seen


def test_every_step_metrics_match_torch() -> None:
    model = mlp()
    groups: list[dict[str, Any]] = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
    opt = torch.optim.SGD(groups, lr=0.1)
    watcher, sink = watch(model, opt, sample_every=1000)
    seen = train(model, opt, watcher, 5, batch_size=4, tokens=40)
    names = [n for n, _ in model.named_parameters()]
    for step, (loss, grads) in enumerate(seen):
        got = sink.scalars[step]
        assert got["loss"] == pytest.approx(loss, rel=1e-6)
        per_param = [float(g.norm()) for g in grads]
        assert got["grad_norm/total"] == pytest.approx(math.sqrt(sum(n * n for n in per_param)), rel=1e-5)
        for name, norm in zip(names, per_param, strict=True):
            assert got[f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-5)
        assert not any(k.startswith("lr/") for k in got)  # the optimizer's step logs the LR used (test_run)
        assert got["nonfinite"] == 0.0
        if step:
            assert got["perf/samples_per_s"] == pytest.approx(4 / got["perf/step_time_s"])
            assert got["perf/tokens_per_s"] == pytest.approx(40 / got["perf/step_time_s"])
    assert not any(k.startswith(("weight_norm/", "act/")) for s in range(1, 5) for k in sink.scalars[s])


@pytest.mark.parametrize("mixed", [False, True], ids=["float64", "float64 and float32"])
def test_a_model_trained_in_float64_gets_its_norms(mixed: bool) -> None:
    """Lightning's precision="64-true", or a float64 model for exact checks: the fused norms
    must not ask float32 of float64 tensors (a narrowing torch refuses)."""
    from trimtab import internal

    model = mlp().double()
    if mixed:
        model[2].float()  # one layer in float32: one fused call per precision
    model.forward = lambda x: model[2](model[1](model[0](x.double())).to(model[2].weight.dtype))  # type: ignore[method-assign]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher, sink = watch(model, opt, sample_every=2)
    errors = internal.error_count()
    seen = train(model, opt, watcher, 4)
    assert internal.error_count() == errors
    names = [n for n, _ in model.named_parameters()]
    for step, (_, grads) in enumerate(seen):
        per_param = [float(g.norm()) for g in grads]
        got = sink.scalars[step]
        assert got["grad_norm/total"] == pytest.approx(math.sqrt(sum(n * n for n in per_param)), rel=1e-6)
        for name, norm in zip(names, per_param, strict=True):
            assert got[f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-6)
    assert all(math.isfinite(sink.scalars[2][f"weight_norm/{name}"]) for name in names)  # a sampled step


def test_sampled_steps_add_norms_ratios_histograms_and_activations() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher, sink = watch(model, opt, sample_every=3, bins=8)
    acts: dict[str, torch.Tensor] = {}
    weights_before: dict[int, list[torch.Tensor]] = {}
    for step in range(7):
        handles = [
            m.register_forward_hook(lambda m, a, o, n=n, s=step: acts.__setitem__(f"{s}/{n}", o.detach()))
            for n, m in model.named_children()
        ]
        weights_before[step] = [p.detach().clone() for p in model.parameters()]
        loss = model(torch.randn(5, 6)).pow(2).mean()
        for h in handles:
            h.remove()
        loss.backward()  # type: ignore[no-untyped-call]
        armed = [n for n, m in model.named_children() if m._forward_hooks]
        assert (step % 3 == 0) == bool(armed), f"hooks are live only on sampled steps (step {step}: {armed})"
        watcher.step(loss, step, None, None)
        opt.step()
        opt.zero_grad()
    watcher.close()
    for step in (0, 3, 6):
        got = sink.scalars[step]
        after = weights_before[step + 1] if step + 1 in weights_before else [p.detach() for p in model.parameters()]
        for (name, _), w0, w1 in zip(model.named_parameters(), weights_before[step], after, strict=True):
            assert got[f"weight_norm/{name}"] == pytest.approx(float(w0.norm()), rel=1e-5)
            assert got[f"update_ratio/{name}"] == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-4)
            counts, lo, width = sink.histograms[(f"weights/{name}", step)]
            assert sum(counts[:8]) == w0.numel() and counts[8:] == [0, 0, 0]
            assert lo == pytest.approx(float(w0.min())) and lo + width == pytest.approx(float(w0.max()))
            assert (f"grads/{name}", step) in sink.histograms
        relu = acts[f"{step}/1"]
        assert got["act/1/zero_frac"] == pytest.approx(float((relu == 0).float().mean()))
        assert got["act/0/mean"] == pytest.approx(float(acts[f"{step}/0"].mean()), abs=1e-6)
        assert got["act/2/std"] == pytest.approx(float(acts[f"{step}/2"].std()), rel=1e-5)
        assert got["act/2/max_abs"] == pytest.approx(float(acts[f"{step}/2"].abs().max()))
        assert sum(sink.histograms[("acts/1", step)][0]) == relu.numel()
        # the second Linear's input is the ReLU's output; the first one's is data: not measured
        assert got["act/2/input_zero_frac"] == pytest.approx(got["act/1/zero_frac"])
        assert "act/0/input_zero_frac" not in got and "act/1/input_zero_frac" not in got
    assert not any(k.startswith("weight_norm/") for k in sink.scalars[4])
    assert ("weights/0.weight", 4) not in sink.histograms


class FunctionalNet(nn.Module):
    """ReLU and GELU as functions, as most transformer code writes them: no module to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))
        return out


def test_units_dead_behind_functional_activations_are_seen_at_the_next_layer() -> None:
    from trimtab.detectors import DEFAULT_RULES, RuleEvaluator

    torch.manual_seed(0)
    model = FunctionalNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=1, overhead_budget=None)
    for step in range(6):
        if step == 3:
            with torch.no_grad():  # a burst killed them: every pre-activation far below zero
                model.fc1.bias.fill_(-50.0)
                model.fc2.bias.fill_(-50.0)
        loss = model(torch.randn(16, 6)).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        opt.step()
        opt.zero_grad()
    watcher.close()
    assert sink.scalars[0]["act/fc2/input_zero_frac"] < 0.9 and sink.scalars[0]["act/fc3/input_zero_frac"] < 0.1
    assert sink.scalars[4]["act/fc2/input_zero_frac"] == 1.0  # F.relu: exact zeros
    assert sink.scalars[4]["act/fc3/input_zero_frac"] == 1.0  # F.gelu of -50: below the tolerance
    assert "act/fc1/input_zero_frac" not in sink.scalars[4]  # the data: not a unit activation
    (dead,) = [r for r in DEFAULT_RULES if r.name == "dead-units"]
    evaluator = RuleEvaluator(dead, "act/fc2/input_zero_frac")
    found = [
        evaluator.update("act/fc2/input_zero_frac", s, sink.scalars[s]["act/fc2/input_zero_frac"]) for s in range(6)
    ]
    assert [f.step for f in found if f is not None] == [4, 5]  # patience 2


def test_loss_scale_and_scaled_gradients_are_unscaled() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    watcher, sink = watch(model, opt, scaler=scaler, sample_every=1000)
    for step in range(2):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        if step == 1:
            scaler.unscale_(opt)  # the clip-gradients recipe: already unscaled when the agent looks
        true_norm = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())  # type: ignore[union-attr]
        if step == 0:
            true_norm /= 1024.0
        watcher.step(loss, step, None, None)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert sink.scalars[step]["grad_norm/total"] == pytest.approx(true_norm, rel=1e-5)
        assert sink.scalars[step]["loss_scale"] == 1024.0


class Explodes(nn.Module):
    """Finite inputs in, +Inf out, for the rows whose first feature saturated (tanh = 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[:, :1] >= 1.0, torch.full_like(x, math.inf), x)


class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, math.nan)


class BackwardBomb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NanGrad.apply(x) if self.armed else x  # type: ignore[no-untyped-call,no-any-return]


def test_nan_provenance_names_the_module_where_values_went_non_finite() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), Explodes(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=1000)
    for step in range(6):
        x = torch.randn(4, 6)
        loss = model(x).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        opt.zero_grad()  # no optimizer step: the weights stay finite
        if step == 2:  # make the next batches blow up inside module 2
            first: nn.Linear = model[0]  # type: ignore[assignment]
            first.bias.data[0] = 1e4
    watcher.close()
    assert [sink.scalars[s]["nonfinite"] for s in range(6)] == [0, 0, 0, 1, 1, 1]
    (event,) = [e for e in sink.events if e[0] == "nonfinite"]  # once per streak
    _kind, event_step, data, level = event
    assert (event_step, level, data["source"], data["module"]) == (3, "error", "forward", "2")
    assert data["batch_finite"] is True
    assert data["forward"]["inputs_finite"] is True and data["forward"]["output"]["pinf"] > 0
    assert data["param"] == "3.weight"  # backward reaches the last layer first
    assert data["n_nonfinite_params"] == 2  # torch.where stops the Inf before it reaches layer 0
    assert data["nonfinite_params"][0] == "3.weight"


def test_backward_only_nan_is_blamed_on_a_parameter() -> None:
    torch.manual_seed(0)
    bomb = BackwardBomb()
    model = nn.Sequential(nn.Linear(6, 6), bomb, nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=1000)
    for step in range(4):
        bomb.armed = step == 2
        loss = model(torch.randn(4, 6)).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        opt.zero_grad()
    watcher.close()
    ((_, event_step, data, _),) = [e for e in sink.events if e[0] == "nonfinite"]
    assert event_step == 2 and data["source"] == "backward"
    assert data["forward"]["replayed"] is True and data["forward"]["finite"] is True
    assert data["param"] == "0.weight"  # layer 0's two gradients: registration order breaks the tie
    assert data["backward"]["grad"]["nan"] == data["backward"]["grad"]["numel"]
    assert set(data["nonfinite_params"]) == {"0.weight", "0.bias"}


def test_backward_blame_without_per_parameter_norms() -> None:
    torch.manual_seed(0)
    bomb = BackwardBomb()
    model = nn.Sequential(nn.Linear(6, 6), bomb, nn.Linear(6, 2))
    watcher, sink = watch(model, None, sample_every=1000, param_grad_norms=False)
    for step in range(3):
        bomb.armed = step == 2  # step 2 is not sampled: only the total norm is known
        loss = model(torch.randn(4, 6)).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        model.zero_grad()
    watcher.close()
    ((_, _, data, _),) = [e for e in sink.events if e[0] == "nonfinite"]
    assert data["source"] == "backward" and data["param"] is None and "grad_norm/0.weight" not in sink.scalars[2]


def test_a_bad_batch_is_blamed_on_the_batch_and_a_new_streak_gets_a_new_event() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=1000)
    for step in range(5):
        x = torch.randn(4, 6)
        if step in (1, 3):
            x[0, 0] = math.nan
        model(x).pow(2).mean().backward()  # type: ignore[no-untyped-call]
        watcher.step(None, step, None, None)
        opt.zero_grad()
    watcher.close()
    events = [(e[1], e[2]["source"], e[2]["module"]) for e in sink.events if e[0] == "nonfinite"]
    assert events == [(1, "batch", "0"), (3, "batch", "0")]
    assert "loss" not in sink.scalars[1] and sink.scalars[1]["nonfinite"] == 1.0


def governed(watcher: Watcher, sink: Recorder, agent_ms: float, plain_agent_ms: float) -> list[dict[str, Any]]:
    """One window of 10 steps of 100 ms each: the agent took ``agent_ms`` in all, of which the
    steps that sampled nothing (9 of them) took ``plain_agent_ms``."""
    from trimtab.overhead import Window

    watcher.meter.total = Window(agent=agent_ms / 1e3, wall=1.0, steps=10)
    watcher.meter.plain = Window(agent=plain_agent_ms / 1e3, wall=0.9, steps=9)
    before = len(sink.events)
    watcher._report_overhead(step=0)
    return [e[2] for e in sink.events[before:] if e[0] == "overhead_governor"]


def test_the_governor_policy() -> None:
    watcher, sink = watch(mlp(), None, sample_every=10, overhead_budget=0.02)
    assert governed(watcher, sink, agent_ms=50, plain_agent_ms=1) == []  # the first window is warm-up
    assert governed(watcher, sink, agent_ms=10, plain_agent_ms=9) == []  # 1 %: under budget
    (doubled,) = governed(watcher, sink, agent_ms=50, plain_agent_ms=1)  # sampled steps too costly
    assert doubled["sample_every"] == 20 == watcher.sample_every and doubled["per_param_grad_norms"] is True
    (per_param,) = governed(watcher, sink, agent_ms=50, plain_agent_ms=40)  # every-step work too costly
    assert per_param["per_param_grad_norms"] is False and watcher.sample_every == 20
    (nothing,) = governed(watcher, sink, agent_ms=50, plain_agent_ms=40)
    assert nothing["action"].startswith("nothing left to cut") and watcher.sample_every == 20
    assert governed(watcher, sink, agent_ms=50, plain_agent_ms=40) == []  # said once
    reported = [r["agent/overhead_pct"] for r in sink.scalars.values() if "agent/overhead_pct" in r]
    assert reported and reported[-1] == pytest.approx(100 * 0.05 / 0.95)


def test_the_agent_reports_its_overhead_while_training() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=4)
    train(model, opt, watcher, 13)
    reports = {s: r["agent/overhead_pct"] for s, r in sink.scalars.items() if "agent/overhead_pct" in r}
    # every 4 steps while the governor keeps the cadence (on a toy model it may not)
    assert sorted(reports)[:2] == [4, 8] and all(v > 0 for v in reports.values())


def test_every_step_overhead_over_budget_turns_per_parameter_norms_to_sampled_steps() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=4, overhead_budget=1e-9)
    train(model, opt, watcher, 20)
    first = next(e for e in sink.events if e[0] == "overhead_governor")
    assert first[2]["per_param_grad_norms"] is False
    late = max(s for s in sink.scalars if s % watcher.sample_every)
    assert "grad_norm/total" in sink.scalars[late] and "grad_norm/0.weight" not in sink.scalars[late]


def test_no_budget_means_the_cadence_never_changes() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=4, overhead_budget=None)
    train(model, opt, watcher, 20)
    assert not any(e[0] == "overhead_governor" for e in sink.events)
    assert watcher.sample_every == 4 and all("grad_norm/0.weight" in sink.scalars[s] for s in range(20))
    assert any("agent/overhead_pct" in r for r in sink.scalars.values())  # still measured and reported
    with pytest.raises(ValueError, match="or None"):
        WatchOptions(overhead_budget=0).check()


def test_a_nan_in_an_earlier_micro_batch_is_found() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=1000)
    for step in range(2):
        total = torch.zeros(())
        for micro in range(3):
            x = torch.randn(4, 6)
            if step == 1 and micro == 0:
                x[1, 1] = math.inf
            loss = model(x).pow(2).mean() / 3
            loss.backward()  # type: ignore[no-untyped-call]
            total += loss.detach()
        watcher.step(total, step, None, None)
        opt.zero_grad()
    watcher.close()
    ((_, at, data, _),) = [e for e in sink.events if e[0] == "nonfinite"]
    assert at == 1 and data["source"] == "batch" and data["module"] == "0"
    assert data["forward"]["micro_batch"] == 0 and data["forward"]["micro_batches"] == 1


def test_without_kept_inputs_the_event_says_why_there_was_no_replay() -> None:
    model = mlp()
    watcher, sink = watch(model, None, sample_every=1000)
    x = torch.randn(4, 6)
    x[0, 0] = math.nan
    out = model[2](model[1](model[0](x)))  # the layers one by one: the model's forward never runs
    out.sum().backward()  # type: ignore[no-untyped-call]
    watcher.step(out.sum(), 0, None, None)
    watcher.close()
    ((_, _, data, _),) = sink.events
    assert data["forward"]["replayed"] is False and "not called" in data["forward"]["reason"]
    assert data["source"] == "forward" and data["module"] is None and data["param"] == "2.weight"


def test_a_grad_scaler_overflow_is_not_a_nan_incident() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    watcher, sink = watch(model, opt, scaler=scaler, sample_every=1000)
    for step in range(3):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        if step == 1:
            model[0].weight.grad[0, 0] = math.inf  # type: ignore[index,operator]  # an fp16 overflow
        watcher.step(loss, step, None, None)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    watcher.close()
    assert sink.scalars[1]["amp_overflow"] == 1.0 and sink.scalars[1]["nonfinite"] == 0.0
    assert not any(k.startswith("grad_norm/") for k in sink.scalars[1])  # meaningless on a skipped step
    assert "grad_norm/total" in sink.scalars[0]
    assert "amp_overflow" not in sink.scalars[2] and sink.scalars[2]["loss_scale"] == 2.0**15  # halved
    assert not sink.events


def test_update_ratio_of_a_large_tensor_is_estimated_from_a_sample() -> None:
    torch.manual_seed(0)
    model = nn.Linear(200, 100)  # 20 000 weights: sampled; 100 biases: exact
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 200)).pow(2).mean().backward()  # type: ignore[no-untyped-call]
    watcher.step(None, 0, None, None)
    opt.step()
    watcher.close()
    exact = [float((p.detach() - b).norm() / b.norm()) for p, b in zip(model.parameters(), before, strict=True)]
    assert sink.scalars[0]["update_ratio/weight"] == pytest.approx(exact[0], rel=0.05)
    assert sink.scalars[0]["update_ratio/bias"] == pytest.approx(exact[1], rel=1e-5)


def test_activation_statistics_are_exact_over_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import trimtab.activations as activations

    monkeypatch.setattr(activations, "STATS_CHUNK", 1000)
    x = torch.randn(4321, generator=torch.Generator().manual_seed(4)) * 3 + 1
    x[::7] = 0.0
    probe = activations.ActivationProbe([], bins=8, histograms=False, warn=lambda t, m: None)
    layer_input = x.clone()
    layer_input[::3] = 1e-7  # near zero: counted with the exact zeros
    stats, _ = probe._summarize(x.bfloat16(), layer_input)
    ref = x.bfloat16().float()
    expected = [float(ref.mean()), float(ref.std()), float(ref.abs().max()), float((ref == 0).float().mean())]
    expected.append(float((layer_input.abs() <= 1e-6).float().mean()))
    assert stats.tolist() == pytest.approx(expected, rel=1e-5)
    assert math.isnan(probe._summarize(x, None)[0][4])  # not a layer input: not measured


# --------------------------------------------------------------------------- awkward models


def test_a_model_without_parameters_still_logs_the_loss(caplog: pytest.LogCaptureFixture) -> None:
    watcher, sink = watch(nn.ReLU(), None, sample_every=2)
    for step in range(3):
        watcher.step(torch.tensor(float(step)), step, None, None)
    watcher.close()
    assert [sink.scalars[s]["loss"] for s in range(3)] == [0.0, 1.0, 2.0]
    assert "watch-empty" in sink.warnings
    watcher, sink = watch(nn.ReLU(), None)
    watcher.step(math.inf, 0, None, None)  # a plain number: no device involved
    watcher.step(1.5, 1, None, None)
    assert [(sink.scalars[s]["loss"], sink.scalars[s]["nonfinite"]) for s in (0, 1)] == [(math.inf, 1.0), (1.5, 0.0)]


def test_frozen_and_unused_parameters_are_left_out() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "frozen": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    model["frozen"].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    watcher, sink = watch(model, opt, sample_every=2)
    for step in range(3):
        loss = model["used"](model["frozen"](torch.randn(2, 4))).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        opt.step()
        opt.zero_grad()
    watcher.close()
    keys = set(sink.scalars[0])
    assert {"grad_norm/used.weight", "weight_norm/unused.weight"} <= keys
    assert not any(k.startswith(("grad_norm/frozen", "weight_norm/frozen", "update_ratio/frozen")) for k in keys)
    assert "act/frozen/mean" in keys  # a frozen layer's activations still matter
    assert "grad_norm/unused.weight" not in keys
    assert sink.scalars[2]["nonfinite"] == 0.0


def test_sparse_gradients() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    watcher, sink = watch(emb, opt, sample_every=1)
    idx = torch.tensor([1, 1, 4])
    loss = emb(idx).sum()
    loss.backward()  # type: ignore[no-untyped-call]
    dense = emb.weight.grad.to_dense()  # type: ignore[union-attr]
    watcher.step(loss, 0, None, None)
    opt.step()
    watcher.close()
    assert sink.scalars[0]["grad_norm/weight"] == pytest.approx(float(dense.norm()))
    assert ("weights/weight", 0) in sink.histograms and ("grads/weight", 0) not in sink.histograms


class ComplexLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        self.counter: torch.Tensor
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counter += 1
        return (x * self.w).abs()


def test_complex_parameters_and_integer_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ComplexLayer(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=1)
    for step in range(2):
        out = model(torch.randn(3, 4))
        out.argmax(-1)  # an integer tensor nobody hooks
        loss = out.sum()
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        opt.step()
        opt.zero_grad()
    watcher.close()
    assert sink.scalars[1]["grad_norm/0.w"] > 0
    assert ("weights/0.w", 0) not in sink.histograms and ("weights/1.weight", 0) in sink.histograms
    assert "update_ratio/1.weight" in sink.scalars[0]


class Hostile(torch.Tensor):
    """A tensor subclass whose every torch operation fails: what a broken extension looks like."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.detach or getattr(func, "__name__", "") in ("detach",):
            raise RuntimeError("hostile tensor")
        return super().__torch_function__(func, types, args, kwargs or {})  # type: ignore[no-untyped-call]


class EmitsHostile(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.as_subclass(Hostile)


def test_a_module_whose_output_breaks_the_hook_is_skipped_with_one_warning() -> None:
    model = nn.Sequential(nn.Linear(4, 4), EmitsHostile())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=1)
    for step in range(3):
        loss = model(torch.randn(2, 4)).as_subclass(torch.Tensor).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        opt.step()
        opt.zero_grad()
    watcher.close()
    assert "act:1" in sink.warnings and "hostile" in sink.warnings["act:1"]
    assert "act/0/mean" in sink.scalars[2] and "act/1/mean" not in sink.scalars[2]
    assert all(sink.scalars[s]["nonfinite"] == 0.0 and math.isfinite(sink.scalars[s]["loss"]) for s in range(3))


def test_watch_through_a_run(caplog: pytest.LogCaptureFixture) -> None:
    import trimtab

    run = trimtab.init(server="http://127.0.0.1:9", spool_dir="off", replay_orphans=False)
    try:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(TypeError, match="sample_evry"):
            run.watch(model, opt, sample_evry=10)
        with pytest.raises(ValueError, match="bins"):
            run.watch(model, opt, bins=0)
        run.watch(model, opt)
        with caplog.at_level(logging.WARNING, logger="trimtab"):
            run.watch(model, opt)
            run.watch(model, opt)
        assert caplog.text.count("already watches") == 1
        loss = model(torch.randn(2, 6)).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss)
        run.log({"val/acc": 0.5})  # lands at the step just recorded
        run.step(loss)
        assert run._train_step == 1
        records = list(run._buffer._records)
        assert any(step == 0 and "val/acc" in data for step, _, data in records)
        run.step("not a loss", step=2.5)  # type: ignore[arg-type]
        run.step(loss, step=3)
        assert run._train_step == 3
        assert model._forward_pre_hooks and opt._optimizer_step_post_hooks
        run.unwatch()
        assert not model._forward_pre_hooks and not opt._optimizer_step_post_hooks
        assert not any(m._forward_hooks for m in model.modules())
    finally:
        run.finish(timeout=1)


def test_depth_ratio_is_first_over_last_weight_matrix() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher, sink = watch(model, opt, sample_every=1000)
    seen = train(model, opt, watcher, 3)
    for step, (_, grads) in enumerate(seen):
        first, last = float(grads[0].norm()), float(grads[2].norm())  # 0.weight and 2.weight, not the biases
        assert sink.scalars[step]["grad_norm/depth_ratio"] == pytest.approx(first / last, rel=1e-5)
