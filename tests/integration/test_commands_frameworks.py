"""skip_batches and stop through a real server into a Lightning fit and a Hugging Face Trainer:
a callback in the training process sends the commands to the server at a known step (and waits
until the agent has them), so the step where they take effect is known."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.helpers import ServerProcess, wait_until


def send(server: ServerProcess, run_id: int, kind: str, **args: Any) -> str:
    req = urllib.request.Request(
        f"{server.url}/api/v1/runs/{run_id}/commands",
        data=json.dumps({"kind": kind, "args": args}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        ident: str = json.loads(resp.read())["id"]

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
            run = trimtab_cb.run
            assert run is not None
            run_id = run.wait_for_id(30)
            assert run_id is not None
            if trainer.global_step == 3 and "skip" not in sent:
                sent["skip"] = send(server, run_id, "skip_batches", n=2)
            if trainer.global_step == 8 and "stop" not in sent:
                sent["stop"] = send(server, run_id, "stop")

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            weights[trainer.global_step] = module.net[0].weight.detach().clone()

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 4), torch.randn(256, 1))
    trainer = pl.Trainer(
        max_steps=60,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[trimtab_cb, Operator()],
    )
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
            run = trimtab_cb.run
            assert run is not None
            run_id = run.wait_for_id(30)
            assert run_id is not None
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
