"""skip_batches, stop and reduce_lr through a real server into a Lightning fit and a Hugging Face Trainer:
a callback in the training process sends the commands to the server at a known step (and waits
until the agent has them), so the step where they take effect is known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.helpers import ServerProcess, post_command, quiet_trainer, wait_until


def send(server: ServerProcess, run_id: int, kind: str, **args: Any) -> str:
    ident = post_command(server, run_id, kind, **args)

    def received() -> bool:
        return bool(server.get(f"/api/v1/runs/{run_id}/commands/{ident}")["status"] != "pending")

    wait_until(received, 30, f"the agent to receive {kind}")  # in its inbox now
    return ident


def command(server: ServerProcess, run_id: int, ident: str) -> dict[str, Any]:
    got: dict[str, Any] = server.get(f"/api/v1/runs/{run_id}/commands/{ident}")
    return got


def test_lightning_skips_and_stops(server: ServerProcess, tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from trimtab.integrations.lightning import TrimtabCallback

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    trimtab_cb = TrimtabCallback(server=server.url, spool_dir=str(tmp_path), project="pl", name="pl-control")
    weights: dict[int, torch.Tensor] = {}
    sent: dict[str, str] = {}

    class Operator(pl.Callback):  # type: ignore[misc]
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            run_id = run_id_of(trimtab_cb)
            if trainer.global_step == 3 and "skip" not in sent:
                sent["skip"] = send(server, run_id, "skip_batches", n=2)
            if trainer.global_step == 8 and "stop" not in sent:
                sent["stop"] = send(server, run_id, "stop")

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            weights[trainer.global_step] = module.net[0].weight.detach().clone()

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 4), torch.randn(256, 1))
    trainer = quiet_trainer(tmp_path, [trimtab_cb, Operator()], max_steps=60)
    trainer.fit(Regressor(), DataLoader(data, batch_size=4))
    run_id = trimtab_cb_run_id(server, "pl-control")
    skip = command(server, run_id, sent["skip"])
    stop = command(server, run_id, sent["stop"])
    assert skip["status"] == "applied" and skip["step"] == 3
    assert stop["status"] == "applied" and stop["step"] == 8
    # after the batches of global steps 3 and 4, the weights are those after step 2's update
    assert torch.equal(weights[3], weights[4]) and torch.equal(weights[4], weights[5])
    assert not torch.equal(weights[5], weights[6]) and not torch.equal(weights[2], weights[3])
    assert trainer.global_step == 9 < 60  # stopped cleanly after the step where stop applied


def run_id_of(callback: Any) -> int:
    """The run id of a framework callback's run (waits until the server gave it one)."""
    run = callback.run
    assert run is not None
    run_id = run.wait_for_id(30)
    assert run_id is not None
    return int(run_id)


def trimtab_cb_run_id(server: ServerProcess, name: str) -> int:
    (run,) = [r for r in server.get("/api/v1/runs?limit=100") if r["name"] == name]
    assert run["status"] == "finished"
    return int(run["id"])


def test_hugging_face_trainer_skips_and_stops(server: ServerProcess, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from trimtab.integrations.transformers import TrimtabCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (256, 16))]
    trimtab_cb = TrimtabCallback(server=server.url, spool_dir=str(tmp_path / "spool"), project="hf", name="hf-control")
    weights: dict[int, torch.Tensor] = {}
    sent: dict[str, str] = {}

    class Operator(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            run_id = run_id_of(trimtab_cb)
            if state.global_step == 3 and "skip" not in sent:
                sent["skip"] = send(server, run_id, "skip_batches", n=2)
            if state.global_step == 7 and "stop" not in sent:
                sent["stop"] = send(server, run_id, "stop")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            weights[state.global_step] = model.transformer.h[0].mlp.c_fc.weight.detach().clone()  # type: ignore[union-attr,index,operator]

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=40,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[trimtab_cb, Operator()]).train()
    run_id = trimtab_cb_run_id(server, "hf-control")
    skip = command(server, run_id, sent["skip"])
    stop = command(server, run_id, sent["stop"])
    assert skip["status"] == "applied" and skip["step"] == 3
    assert stop["status"] == "applied" and stop["step"] == 7
    # on_step_end of global step k runs after the k-th update: steps 4 and 5 applied none
    assert torch.equal(weights[3], weights[4]) and torch.equal(weights[4], weights[5])
    assert not torch.equal(weights[5], weights[6]) and not torch.equal(weights[2], weights[3])
    assert max(weights) == 8  # the Trainer stopped after the step where stop applied, not at 40


# ---------------------------------------------------------------- LR commands under a framework
# Black-box, as in tests/agent/test_lr.py: with plain SGD (no momentum, no weight decay, no
# clipping) in float64, each update is dW = -lr_used * grad, so the LR the framework's update
# really used is read off the weights. The framework's scheduler owns the LR and sets it every
# step; a reduce_lr sent at step CUT must hold on top of it for every later update.

CUT, STEPS_LR, FACTOR = 10, 30, 0.1


def _warm_then_decay(step: int) -> float:
    return min(1.0, (step + 1) / 5) * 0.9**step


class _UpdateProbe:
    """Weights and gradients before each update, weights after it, the LR the optimizer's
    groups hold before it (the owner's), and what the agent says the update uses."""

    def __init__(self) -> None:
        self.before: dict[int, tuple[torch.Tensor, torch.Tensor, float, float]] = {}
        self.after: dict[int, torch.Tensor] = {}

    def pre(self, step: int, weight: torch.Tensor, owner_lr: float, agent_lr: float) -> None:
        assert weight.grad is not None
        self.before[step] = (weight.detach().clone(), weight.grad.detach().clone(), owner_lr, agent_lr)

    def post(self, step: int, weight: torch.Tensor) -> None:
        self.after[step] = weight.detach().clone()

    def used(self, step: int) -> float:
        before, grad, _, _ = self.before[step]
        i = int(grad.abs().argmax())
        return float((before.reshape(-1)[i] - self.after[step].reshape(-1)[i]) / grad.reshape(-1)[i])

    def check(self, server: ServerProcess, run_id: int, base_lr: float) -> None:
        steps = sorted(set(self.before) & set(self.after))
        assert steps[: STEPS_LR - 1] == list(range(STEPS_LR - 1)), steps
        logged = server.get(f"/api/v1/runs/{run_id}/scalars?key=lr/group0")
        by_step = dict(zip(logged["steps"], logged["values"], strict=True))
        for step in steps:
            _, _, owner, agent = self.before[step]
            assert owner == pytest.approx(base_lr * _warm_then_decay(step), rel=1e-12), step  # schedule untouched
            want = owner * (FACTOR if step >= CUT else 1.0)
            assert self.used(step) == pytest.approx(want, rel=1e-9), step  # what the update did
            assert agent == pytest.approx(want, rel=1e-12), step  # run.learning_rates()
            assert by_step[step] == pytest.approx(want, rel=1e-12), step  # lr/group0 on the server


def test_lightning_reduce_lr_holds_under_its_scheduler(server: ServerProcess, tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from trimtab.integrations.lightning import TrimtabCallback

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _warm_then_decay)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trimtab_cb = TrimtabCallback(server=server.url, spool_dir=str(tmp_path), project="pl", name="pl-lr")
    probe, sent = _UpdateProbe(), {}

    class Operator(pl.Callback):  # type: ignore[misc]
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            run_id = run_id_of(trimtab_cb)
            if trainer.global_step == CUT and "cut" not in sent:
                sent["cut"] = send(server, run_id, "reduce_lr", factor=FACTOR)

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            # after trimtab's callback (listed first) reached the step boundary
            assert trimtab_cb.run is not None
            lr = trimtab_cb.run.learning_rates()[0]
            probe.pre(trainer.global_step, module.net.weight, optimizer.param_groups[0]["lr"], lr)

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            probe.post(trainer.global_step - 1, module.net.weight)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 4, dtype=torch.float64), torch.randn(256, 1, dtype=torch.float64))
    trainer = quiet_trainer(tmp_path, [trimtab_cb, Operator()], max_steps=STEPS_LR, precision="64-true")
    trainer.fit(Regressor(), DataLoader(data, batch_size=8))
    run_id = trimtab_cb_run_id(server, "pl-lr")
    cut = command(server, run_id, sent["cut"])
    assert cut["status"] == "applied" and cut["step"] == CUT
    probe.check(server, run_id, 0.05)


def test_hugging_face_trainer_reduce_lr_holds_under_its_scheduler(server: ServerProcess, tmp_path: Path) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trimtab.integrations.transformers import TrimtabCallback

    class Regressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1).double()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.mse_loss(self.net(x), labels)}

    torch.manual_seed(0)
    model = Regressor()
    rows = [
        {"x": x, "labels": y} for x, y in zip(torch.randn(256, 4).double(), torch.randn(256, 1).double(), strict=True)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warm_then_decay)
    trimtab_cb = TrimtabCallback(server=server.url, spool_dir=str(tmp_path / "spool"), project="hf", name="hf-lr")
    probe, sent = _UpdateProbe(), {}

    class Operator(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            run_id = run_id_of(trimtab_cb)
            if state.global_step == CUT and "cut" not in sent:
                sent["cut"] = send(server, run_id, "reduce_lr", factor=FACTOR)

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            assert trimtab_cb.run is not None
            lr = trimtab_cb.run.learning_rates()[0]
            probe.pre(state.global_step, model.net.weight, opt.param_groups[0]["lr"], lr)

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            probe.post(state.global_step, model.net.weight)

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS_LR,
        per_device_train_batch_size=8,
        max_grad_norm=0,  # no clipping: dW = -lr * grad
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(
        model=model, args=args, train_dataset=rows, optimizers=(opt, sched), callbacks=[trimtab_cb, Operator()]
    ).train()
    run_id = trimtab_cb_run_id(server, "hf-lr")
    cut = command(server, run_id, sent["cut"])
    assert cut["status"] == "applied" and cut["step"] == CUT
    probe.check(server, run_id, 0.05)
