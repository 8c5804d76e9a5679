"""The agent's CUDA paths end to end, through the public ``Run``: bf16 autocast, fp16 with a
GradScaler (overflow skips included), fused AdamW, commands, snapshots and the autopilot.

Steps that sample nothing run under ``torch.cuda.set_sync_debug_mode("error")`` from the
forward pass to the end of ``optimizer.step`` (the command wrapper included), so any
synchronising call of the agent raises. The runs are offline (a closed port, a disk spool)
and keep their records in the buffer, where the tests read them. These tests need a CUDA
device: this project's CI machine has none, so ``scripts/gpu_check.sh`` runs them on a GPU
machine (``benchmarks/RESULTS.md`` records where they last ran).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import trimtab
from tests.agent.test_cuda_sync import no_sync
from tests.helpers import free_port
from trimtab.histogram import _device, _host
from trimtab.protocol import Command, unpack_array

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VOCAB, D, SEQ, BATCH = 256, 64, 32, 8


@pytest.fixture
def run(tmp_path: Path) -> Iterator[trimtab.Run]:
    r = trimtab.init(
        server=f"http://127.0.0.1:{free_port()}",
        project="cuda",
        spool_dir=str(tmp_path / "spool"),
        replay_orphans=False,
        flush_interval=3600,  # records stay in the buffer, where the tests read them
        max_queue=1_000_000,
    )
    yield r
    r.finish(timeout=0.5)


def transformer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, D),
        nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True, norm_first=True),
        nn.Linear(D, VOCAB),
    ).cuda()


def head_weight(model: nn.Sequential) -> torch.Tensor:
    head = model[2]
    assert isinstance(head, nn.Linear)
    return head.weight


def records(run: trimtab.Run) -> dict[int, dict[str, Any]]:
    """Every scalar the run logged so far, merged per step (hands over landed copies first)."""
    watcher = run._watcher
    if watcher is not None:
        watcher.transfers.poll(wait=True)
    out: dict[int, dict[str, Any]] = {}
    for step, _wall, record in run._buffer._records:
        out.setdefault(step, {}).update({k: float(v) for k, v in record.items()})
    return out


def events(run: trimtab.Run, kind: str) -> list[dict[str, Any]]:
    return [e for e in run._buffer._events if e.get("kind") == kind]


def cmd(ident: str, kind: str, **args: Any) -> Command:
    return Command(ident, kind, args)  # a decoded cmd frame, as the sender hands it over


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device="cuda", generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    x, y = data
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x)
    return nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))


def train(
    run: trimtab.Run,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    checked: Callable[[int], bool],
    before: Callable[[int], None] | None = None,
) -> None:
    """A bf16 training loop; the steps ``checked`` selects run under the sync check, from the
    forward pass to the end of ``optimizer.step`` (the batch is made before the checked window:
    only the agent's calls are judged). ``before(step)`` runs first (to hand over commands)."""
    for step in range(steps):
        if before is not None:
            before(step)
        data = batch(step)
        with no_sync(checked(step)):
            loss = loss_of(model, data, torch.bfloat16)
            loss.backward()  # type: ignore[no-untyped-call]
            run.step(loss, step=step)
            opt.step()
            opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_bf16_autocast_run_never_synchronises_off_sampled_steps(run: trimtab.Run, fused: bool) -> None:
    model = transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    run.watch(model, opt, sample_every=10, overhead_budget=None, batch_size=BATCH, tokens_per_step=BATCH * SEQ)

    def hand_over(step: int) -> None:
        if step == 15:
            run._control.receive(cmd("lr", "reduce_lr", factor=0.5))  # as the sender thread does

    train(run, model, opt, 40, lambda step: step % 10 != 0, hand_over)
    got = records(run)
    assert sorted(s for s in got if "loss" in got[s]) == list(range(40))
    assert all(math.isfinite(got[s]["grad_norm/total"]) and got[s]["nonfinite"] == 0 for s in range(40))
    assert got[14]["lr/group0"] == pytest.approx(1e-3) and got[15]["lr/group0"] == pytest.approx(5e-4)
    assert "perf/tokens_per_s" in got[5] and "weight_norm/2.weight" in got[20] and "act/2/max_abs" in got[20]
    per_param = [k for k in got[7] if k.startswith("grad_norm/") and k not in ("grad_norm/total",)]
    assert len(per_param) >= len(list(model.parameters()))
    assert any(e["k"] == "weights/2.weight" and e["step"] == 30 for e in run._buffer._histograms)
    (applied,) = [h for h in run.command_history() if h["id"] == "lr"]
    assert applied["status"] == "applied" and applied["step"] == 15


def test_grad_norms_match_a_float64_reference_on_bf16_weights(run: trimtab.Run) -> None:
    model = transformer().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    run.watch(model, opt, sample_every=1)
    x, y = batch(0)
    loss = nn.functional.cross_entropy(model(x).float().reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()  # type: ignore[no-untyped-call]
    expected = {n: float(p.grad.double().norm()) for n, p in model.named_parameters() if p.grad is not None}
    run.step(loss, step=0)
    got = records(run)[0]
    for name, norm in expected.items():
        assert got[f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-3)
    total = math.sqrt(sum(v * v for v in expected.values()))
    assert got["grad_norm/total"] == pytest.approx(total, rel=1e-3)
    hist = next(e for e in run._buffer._histograms if e["k"] == "grads/2.weight")
    assert sum(unpack_array("q", hist["counts"])) + hist["nan"] == head_weight(model).numel()


def test_fp16_overflows_are_amp_skips_not_nan_alarms(run: trimtab.Run) -> None:
    model = transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)  # overflows until the scale backs off
    run.watch(model, opt, scaler=scaler, sample_every=10, overhead_budget=None)
    skipped = []  # the steps GradScaler itself skipped: it halves the scale after each
    for step in range(30):
        data = batch(step)
        with no_sync(step % 10 != 0):
            loss = loss_of(model, data, torch.float16)
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            run.step(loss, step=step)
        before = scaler.get_scale()
        scaler.step(opt)  # reads the inf flag: GradScaler's own synchronisation, not the agent's
        scaler.update()
        if scaler.get_scale() < before:
            skipped.append(step)
        opt.zero_grad(set_to_none=True)
    got = records(run)
    assert skipped[:3] == [0, 1, 2] and len(skipped) < 30  # it overflowed, then found a scale that fits
    assert [s for s in range(30) if got[s].get("amp_overflow") == 1.0] == skipped
    assert all(got[s]["nonfinite"] == 0 for s in range(30)) and not events(run, "nonfinite")
    fine = [s for s in range(30) if s not in skipped]
    assert all(math.isfinite(got[s]["grad_norm/total"]) for s in fine)
    assert all(not any(k.startswith("grad_norm/") for k in got[s]) for s in skipped)
    assert got[29]["loss_scale"] < 2.0**40


def test_skip_batches_and_rollback_on_the_gpu(run: trimtab.Run) -> None:
    model = transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run.watch(model, opt, sample_every=1000, snapshot_every=5)
    weights: dict[int, torch.Tensor] = {}  # after each step's update

    def before(step: int) -> None:
        weights[step - 1] = head_weight(model).detach().clone()
        if step == 8:
            run._control.receive(cmd("skip", "skip_batches", n=2))
        if step == 14:
            run._control.receive(cmd("back", "rollback"))

    train(run, model, opt, 16, lambda step: False, before)
    assert torch.equal(weights[7], weights[8]) and torch.equal(weights[8], weights[9])  # two updates skipped
    assert not torch.equal(weights[9], weights[10])
    history = {h["id"]: h for h in run.command_history()}
    assert history["skip"]["status"] == "applied" and history["back"]["status"] == "applied"
    assert torch.equal(weights[14], weights[9])  # back to the snapshot taken at step 10, before its update
    assert head_weight(model).device.type == "cuda"


def test_a_nan_batch_is_traced_and_the_autopilot_rejects_its_update(run: trimtab.Run) -> None:
    model = transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run.watch(model, opt, sample_every=1000)
    run.autopilot()
    for step in range(12):
        x, y = batch(step)
        h = model[0](x)
        if step == 6:
            h = h.clone()
            h[0, 0, 0] = math.nan
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model[2](model[1](h))
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss, step=step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN update never landed
    actions = [h for h in run.command_history() if h["detail"].get("source") == "autopilot"]
    assert [a["step"] for a in actions] == [6]
    (event,) = events(run, "nonfinite")
    assert event["step"] == 6 and event["data"]["source"] in ("forward", "backward")


def test_device_histograms_agree_with_the_host_and_the_deterministic_path() -> None:
    x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(5)) * 2
    x[10], x[11], x[12] = math.nan, math.inf, -math.inf
    host = _host(x, 64).counts.tolist()
    fast = _device(x.cuda(), 64).counts.tolist()
    torch.use_deterministic_algorithms(True)
    try:
        exact = _device(x.cuda(), 64).counts.tolist()
    finally:
        torch.use_deterministic_algorithms(False)
    assert fast == exact
    assert fast[64:] == host[64:] == [1, 1, 1]
    assert sum(abs(a - b) for a, b in zip(fast, host, strict=True)) <= 10  # float32 rounding at bin edges


def test_sampled_steps_do_not_synchronise_either(run: trimtab.Run) -> None:
    model = transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run.watch(model, opt, sample_every=5, overhead_budget=None)
    train(run, model, opt, 12, lambda step: step > 0)  # the first step allocates the agent's pinned buffers
    got = records(run)
    assert "update_ratio/2.weight" in got[5] and "act/2/std" in got[10] and "weight_norm/2.weight" in got[10]
