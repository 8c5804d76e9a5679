"""Instrumented training reaches a real server: a plain loop, PyTorch Lightning, the Hugging
Face Trainer and a two-rank DDP job, each with a NaN, read back through the REST API."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import trimtab
from tests.helpers import ROOT, ServerProcess, free_port, quiet_trainer, run_by_name, subprocess_env
from trimtab.jsonsafe import float_from_json


def keys_of(server: ServerProcess, run_id: int, rank: int = 0) -> dict[str, dict[str, Any]]:
    return {k["key"]: k for k in server.get(f"/api/v1/runs/{run_id}/keys") if k["rank"] == rank}


def series(server: ServerProcess, run_id: int, key: str, rank: int = 0) -> dict[int, float]:
    data = server.get(f"/api/v1/runs/{run_id}/scalars?key={key}&rank={rank}")
    return {s: float_from_json(v) for s, v in zip(data["steps"], data["values"], strict=True)}


def events_of(server: ServerProcess, run_id: int, kind: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = server.get(f"/api/v1/runs/{run_id}/events?kind={kind}")
    return events


def test_a_plain_loop_streams_every_documented_key(server: ServerProcess, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = trimtab.init(server=server.url, spool_dir=str(tmp_path), project="plain", name="watched")
    # sample_every=6: the overhead governor's first judgement (at its second report, step 12)
    # comes after the last step, so what is sent does not depend on this machine's speed.
    run.watch(model, opt, sample_every=6, batch_size=16)
    losses = {}
    for step in range(12):
        x = torch.randn(16, 8)
        if step == 7:
            x[3, 2] = math.inf
        loss = model(x).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss)
        losses[step] = loss.item()
        if math.isfinite(losses[step]):
            opt.step()
        opt.zero_grad()
    assert run.finish(timeout=60)
    run_id = run_by_name(server, "watched")["id"]

    keys = keys_of(server, run_id)
    expected_scalars = {
        "loss": 12,
        "lr/group0": 11,  # the LR an update used: none at the Inf step, which applies no update
        "grad_norm/total": 12,
        "grad_norm/0.weight": 12,
        "nonfinite": 12,
        "perf/step_time_s": 11,
        "perf/samples_per_s": 11,
        "weight_norm/2.bias": 2,
        "update_ratio/0.weight": 2,
        "act/1/zero_frac": 2,
        "act/2/max_abs": 2,
    }
    for key, count in expected_scalars.items():
        assert keys[key]["kind"] == "scalar" and keys[key]["count"] == count, (key, keys.get(key))
    for key in ("weights/0.weight", "grads/2.weight", "acts/1"):
        assert keys[key]["kind"] == "histogram" and keys[key]["count"] == 2, (key, keys.get(key))

    got = series(server, run_id, "loss")
    assert got.keys() == losses.keys()
    assert all(got[s] == losses[s] or (math.isnan(got[s]) and math.isnan(losses[s])) for s in losses)
    assert series(server, run_id, "nonfinite") == {s: float(s == 7) for s in range(12)}

    hist = server.get(f"/api/v1/runs/{run_id}/histograms?key=weights/0.weight")
    assert [h["step"] for h in hist["histograms"]] == [0, 6]
    for h in hist["histograms"]:
        assert len(h["edges"]) == 65 and sum(h["counts"]) == 8 * 16 and h["edges"] == sorted(h["edges"])
    later = server.get(f"/api/v1/runs/{run_id}/histograms?key=weights/0.weight&since_step=5")
    assert [h["step"] for h in later["histograms"]] == [6]

    (event,) = events_of(server, run_id, "nonfinite")
    assert event["step"] == 7 and event["level"] == "error" and event["rank"] == 0
    data = event["data"]
    assert data["source"] == "batch" and data["module"] == "0" and data["batch_finite"] is False
    assert data["forward"]["output"]["pinf"] + data["forward"]["output"]["ninf"] + data["forward"]["output"]["nan"] > 0
    assert data["param"] == "2.weight"


def test_lightning(server: ServerProcess, tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from trimtab.integrations.lightning import TrimtabCallback

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x)
            return out

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if self.global_step == 6:  # a weight goes bad mid-run
                with torch.no_grad():
                    self.net[2].weight[0, 0] = math.nan  # type: ignore[index,operator]
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    callback = TrimtabCallback(
        server=server.url,
        spool_dir=str(tmp_path),
        project="pl",
        name="lightning",
        watch={"sample_every": 4, "batch_size": 4},
    )
    trainer = quiet_trainer(tmp_path, [callback], max_steps=8, accumulate_grad_batches=2)
    trainer.fit(Regressor(), DataLoader(data, batch_size=4))
    run_id = run_by_name(server, "lightning")["id"]
    assert run_by_name(server, "lightning")["status"] == "finished"
    loss = series(server, run_id, "loss")
    assert sorted(loss) == list(range(8))
    assert all(math.isfinite(loss[s]) for s in range(6)) and math.isnan(loss[6])
    grad = series(server, run_id, "grad_norm/total")
    assert all(v > 0 for s, v in grad.items() if s < 6)
    assert set(keys_of(server, run_id)) >= {"grad_norm/net.0.weight", "weights/net.2.weight", "act/net.1/zero_frac"}
    (event,) = events_of(server, run_id, "nonfinite")
    assert event["step"] == 6 and event["data"]["source"] == "forward" and event["data"]["module"] == "net.2"


def test_hugging_face_trainer(server: ServerProcess, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from trimtab.integrations.transformers import TrimtabCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (32, 16))]

    class Poison(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 4:
                with torch.no_grad():
                    model.transformer.h[1].mlp.c_fc.weight[0, 0] = math.inf  # type: ignore[union-attr,index,operator]

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = TrimtabCallback(
        server=server.url, spool_dir=str(tmp_path / "spool"), project="hf", name="hf-trainer", watch={"sample_every": 3}
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Poison(), callback]).train()
    run = run_by_name(server, "hf-trainer")
    assert run["status"] == "finished"
    loss = series(server, run["id"], "loss")
    assert sorted(loss) == list(range(6))
    assert all(2.0 < loss[s] < 6.0 for s in range(4)), loss  # ~ln(64) for a random model
    keys = keys_of(server, run["id"])
    assert {"grad_norm/total", "lr/group0", "grad_norm/transformer.h.0.attn.c_attn.weight"} <= set(keys)
    assert keys["weights/transformer.wte.weight"]["count"] == 2  # steps 0 and 3; lm_head shares it
    assert keys["hf/grad_norm"]["count"] >= 4
    (event,) = events_of(server, run["id"], "nonfinite")
    assert event["step"] == 4
    assert event["data"]["module"] == "transformer.h.1.mlp.c_fc", event["data"]


def test_ranks_of_a_ddp_job_share_one_run(server: ServerProcess, tmp_path: Path) -> None:
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "scripts" / "ddp_watch.py"),
                "--server",
                server.url,
                "--spool",
                str(tmp_path / f"spool{rank}"),
                "--init",
                init,
                "--rank",
                str(rank),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "FINISH True" in out, out
    uids = {line.split()[2] for out in outs for line in out.splitlines() if line.startswith("FINISH")}
    assert len(uids) == 1, uids
    run = run_by_name(server, "two-ranks")
    assert run["world_size"] == 2 and run["status"] == "finished"
    rank0, rank1 = keys_of(server, run["id"], 0), keys_of(server, run["id"], 1)
    assert rank0["loss"]["count"] == rank1["loss"]["count"] == 6
    assert "weights/0.weight" in rank0 and not any(k.startswith(("weights/", "grads/", "acts/")) for k in rank1)
    assert "weight_norm/0.weight" in rank1
    # DDP averages gradients, so rank 1's NaN batch makes every rank's gradients NaN; only
    # rank 1's event blames its batch, rank 0's blames the backward pass.
    for rank in (0, 1):
        assert series(server, run["id"], "nonfinite", rank=rank) == {s: float(s == 3) for s in range(6)}
    events = {e["rank"]: e for e in events_of(server, run["id"], "nonfinite")}
    assert events.keys() == {0, 1} and events[0]["step"] == events[1]["step"] == 3
    assert events[1]["data"]["source"] == "batch" and events[0]["data"]["source"] == "backward"
