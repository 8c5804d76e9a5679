"""On a GPU, steps that sample nothing never synchronise the host with the device.

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call raise; it is
on around the forward pass, backward pass and ``run.step`` of every non-sampled step. These
tests need a CUDA device: this project's CI machine has none, so they run on a GPU machine
(``benchmarks/RESULTS.md`` records where they last ran).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tests.agent.test_watch import Recorder
from trimtab.watch import Watcher, WatchOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def no_sync(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_non_sampled_steps_do_not_synchronise(amp: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    sink = Recorder()
    watcher = Watcher(sink, model, opt, None, scaler, WatchOptions(sample_every=10))
    data = torch.randn(30, 32, 64, device="cuda")
    for step in range(30):
        sampled = step % 10 == 0
        with no_sync(not sampled):
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = model(data[step]).float().pow(2).mean()
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            watcher.step(loss, step, 32, None)
        scaler.step(opt)  # GradScaler.step reads the inf flag: a sync of its own, not the agent's
        scaler.update()
        opt.zero_grad()
    watcher.close()  # a synchronising call inside watcher.step would have raised out of it
    assert sorted(sink.scalars) == list(range(30))
    assert all(math.isfinite(sink.scalars[s]["grad_norm/total"]) for s in range(30))
    assert ("weights/0.weight", 20) in sink.histograms and "act/1/zero_frac" in sink.scalars[20]
    if amp:
        assert sink.scalars[5]["loss_scale"] > 0


def test_a_nan_on_the_gpu_is_reported_from_the_lagged_copy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sink = Recorder()
    watcher = Watcher(sink, model, opt, None, None, WatchOptions(sample_every=100))
    for step in range(6):
        x = torch.randn(4, 8, device="cuda")
        if step == 3:
            x[0, 0] = math.nan
        # The NaN step's values land during the next step, which then replays the forward
        # pass: that step may synchronise (the cost of a NaN), the others may not.
        with no_sync(step % 100 != 0 and step != 4):
            loss = model(x).pow(2).mean()
            loss.backward()  # type: ignore[no-untyped-call]
            watcher.step(loss, step, None, None)
        opt.zero_grad()
    watcher.close()
    ((_kind, step_at, data, _),) = [e for e in sink.events if e[0] == "nonfinite"]
    assert step_at == 3 and data["source"] == "batch" and data["module"] == "0"
