"""Commands applied on the training thread at a step boundary, on real torch loops: the
controller is driven the way the sender drives it (``receive`` from another thread)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

from trimtab.control import Controller, Target, unwrap_optimizer_step, wrap_optimizer_step
from trimtab.lr import used_lrs
from trimtab.protocol import Command
from trimtab.snapshots import Snapshots


def setup(lr: float = 0.1, **target: Any) -> tuple[nn.Linear, torch.optim.Optimizer, Controller, list[dict[str, Any]]]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.01)
    finals: list[dict[str, Any]] = []
    control = Controller(on_result=finals.append)
    control.target = Target(model, opt, target.get("scheduler"), None)
    wrap_optimizer_step(opt, control)
    return model, opt, control, finals


def train_step(model: nn.Linear, opt: torch.optim.Optimizer, control: Controller, step: int) -> None:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()  # type: ignore[no-untyped-call]
    control.boundary(step)
    opt.step()
    opt.zero_grad()


def cmd(ident: str, kind: str, **args: Any) -> Command:
    return Command(ident, kind, args)  # a decoded cmd frame, as the sender hands it over


def test_delivered_at_once_applied_at_the_next_boundary_and_once_only() -> None:
    model, opt, control, finals = setup()
    control.receive(cmd("a", "reduce_lr", factor=0.5))
    assert [f["status"] for f in control.take_outgoing()] == ["delivered"]
    assert used_lrs(opt, control.lr) == [0.1]  # nothing happens off the training thread
    train_step(model, opt, control, 7)
    (result,) = control.take_outgoing()
    assert result["status"] == "applied" and result["step"] == 7
    assert result["detail"]["before"] == [0.1] and result["detail"]["after"] == [0.05]
    control.receive(cmd("a", "reduce_lr", factor=0.5))  # redelivered after a reconnect
    assert control.take_outgoing() == [result]
    train_step(model, opt, control, 8)
    assert used_lrs(opt, control.lr) == [0.05] and len(finals) == 1 and finals[0]["kind"] == "reduce_lr"
    assert opt.param_groups[0]["lr"] == 0.1  # the owner's LR is untouched: the cut applies at each step


@pytest.mark.parametrize(
    ("kind", "args", "reason"),
    [
        ("reduce_lr", {"factor": 1.5}, "factor must be in (0, 1)"),
        ("reduce_lr", {}, "factor must be a finite number"),
        ("set_lr", {"lr": -1}, "lr must be > 0"),
        ("set_hparams", {"lr": 0.1}, "use set_lr"),
        ("set_hparams", {"momentum": 0.9}, "has no 'momentum'"),
        ("set_hparams", {"betas": [0.9]}, "list of 2 finite numbers"),
        ("set_hparams", {"amsgrad": 1}, "not a numeric"),
        ("skip_batches", {"n": 0}, "n must be an integer >= 1"),
        ("rollback", {}, "no snapshots are kept"),
        ("checkpoint", {}, "no checkpoint handler"),
        ("resume", {}, "not paused"),
        ("warp_speed", {}, "no handler for command 'warp_speed'"),
    ],
)
def test_bad_commands_are_rejected_and_change_nothing(kind: str, args: dict[str, Any], reason: str) -> None:
    model, opt, control, _ = setup()
    before = [dict(g, params=None) for g in opt.param_groups]
    control.receive(cmd("x", kind, **args))
    train_step(model, opt, control, 0)
    final = control.take_outgoing()[-1]
    assert final["status"] == "rejected" and reason in final["detail"]["reason"]
    assert [dict(g, params=None) for g in opt.param_groups] == before


def test_set_lr_and_set_hparams() -> None:
    model, opt, control, _ = setup()
    control.receive(cmd("a", "set_lr", lr=0.02))
    control.receive(cmd("b", "set_hparams", weight_decay=0.1, betas=[0.8, 0.95]))
    train_step(model, opt, control, 0)
    assert used_lrs(opt, control.lr) == pytest.approx([0.02])
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["betas"] == (0.8, 0.95)
    results = control.take_outgoing()
    assert results[-1]["detail"]["before"] == {"weight_decay": 0.01, "betas": [0.9, 0.999]}


def test_skip_batches_leaves_weights_and_optimizer_state_untouched() -> None:
    model, opt, control, _ = setup()
    train_step(model, opt, control, 0)
    control.receive(cmd("s", "skip_batches", n=2))
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    train_step(model, opt, control, 1)
    train_step(model, opt, control, 2)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert all(torch.equal(state[k], opt.state[model.weight][k]) for k in state)
    assert model.weight.grad is None  # zeroed
    train_step(model, opt, control, 3)  # the third update is applied again
    assert not torch.equal(weights[0], model.weight)


def test_skip_with_grad_scaler() -> None:
    model, opt, control, _ = setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    control.receive(cmd("s", "skip_batches", n=1))
    weights = model.weight.detach().clone()
    loss = model(torch.randn(8, 4)).pow(2).mean()
    scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
    control.boundary(0)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(weights, model.weight) and scaler.get_scale() == 1024.0


def test_a_closure_runs_once_and_the_boundary_inside_it_decides() -> None:
    model, opt, control, _ = setup()
    control.receive(cmd("s", "skip_batches", n=1))
    calls = []

    def closure() -> float:
        calls.append(1)
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        control.boundary(len(calls))  # Lightning reaches on_before_optimizer_step in here
        return float(loss.detach())

    weights = model.weight.detach().clone()
    assert opt.step(closure) is not None
    assert torch.equal(weights, model.weight) and calls == [1]
    opt.step(closure)
    assert not torch.equal(weights, model.weight) and calls == [1, 1]
    unwrap_optimizer_step(opt)
    assert not hasattr(opt.step, "_trimtab_original")


def test_a_failing_user_handler_is_rejected_and_training_goes_on() -> None:
    model, opt, control, _ = setup()
    control.handlers["boom"] = lambda args: 1 / 0
    control.handlers["echo"] = lambda args: {"got": args}
    control.receive(cmd("b", "boom"))
    control.receive(cmd("e", "echo", x=1))
    train_step(model, opt, control, 4)
    boom, echo = [r for r in control.take_outgoing() if r["status"] != "delivered"]
    assert boom["status"] == "rejected" and "ZeroDivisionError" in boom["detail"]["reason"]
    assert echo["status"] == "applied" and echo["detail"]["result"] == {"got": {"x": 1}}


def test_pause_waits_at_the_boundary_until_resume() -> None:
    model, opt, control, _ = setup()
    control.receive(cmd("p", "pause"))
    reached: list[int] = []

    def loop() -> None:
        for step in range(3):
            train_step(model, opt, control, step)
            reached.append(step)

    thread = threading.Thread(target=loop)
    thread.start()
    deadline = time.monotonic() + 10
    while not control.paused and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert control.paused and reached == []  # held at step 0's boundary
    control.receive(cmd("r", "resume"))
    thread.join(10)
    assert reached == [0, 1, 2]
    statuses = [(r["id"], r["status"], r["step"]) for r in control.take_outgoing() if r["status"] != "delivered"]
    assert statuses == [("p", "applied", 0), ("r", "applied", 0)]


def test_stop_runs_checkpoint_handlers_and_ends_a_pause() -> None:
    model, opt, control, _ = setup()
    saved: list[int] = []

    def save(step: int) -> str:
        saved.append(step)
        return f"ckpt-{step}"

    control.checkpoint_handlers.append(save)
    control.receive(cmd("c", "checkpoint"))
    control.receive(cmd("s", "stop"))
    train_step(model, opt, control, 9)
    assert saved == [9, 9] and control.stop_requested
    final = [r for r in control.take_outgoing() if r["status"] != "delivered"]
    assert final[0]["detail"]["results"] == ["ckpt-9"] and final[1]["detail"]["checkpoints"] == ["ckpt-9"]


@pytest.mark.parametrize("on_disk", [False, True])
def test_rollback_restores_the_newest_snapshot_and_drops_that_steps_update(on_disk: bool, tmp_path: Any) -> None:
    model, opt, control, _ = setup()
    control.snapshots = Snapshots(every=5, keep=2, directory=tmp_path if on_disk else None)
    seen: dict[int, list[torch.Tensor]] = {}
    restored_to: list[int] = []
    control.rollback_handlers.append(restored_to.append)
    for step in range(13):
        seen[step] = [p.detach().clone() for p in model.parameters()]
        control.snapshots.maybe_take(step, control.target)
        train_step(model, opt, control, step)
    assert control.snapshots.steps() == [5, 10]
    control.receive(cmd("r", "rollback", to_step=8))
    control.snapshots.maybe_take(13, control.target)
    train_step(model, opt, control, 13)
    result = control.take_outgoing()[-1]
    assert result["status"] == "applied" and result["detail"]["restored_step"] == 5 and restored_to == [5]
    assert all(torch.equal(a, b) for a, b in zip(seen[5], model.parameters(), strict=True))  # update dropped
    assert control.snapshots.steps() == [5]  # the future after step 5 is gone
    control.receive(cmd("r2", "rollback", to_step=2))
    train_step(model, opt, control, 14)
    assert "no snapshot at or before step 2" in control.take_outgoing()[-1]["detail"]["reason"]


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_lr_schedulers_before_or_after_the_wrap(scheduler_first: bool, recwarn: pytest.WarningsRecorder) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    control = Controller()
    if scheduler_first:
        sched = torch.optim.lr_scheduler.StepLR(opt, 2)
        wrap_optimizer_step(opt, control)
    else:
        wrap_optimizer_step(opt, control)
        sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    control.receive(cmd("s", "skip_batches", n=1))
    control.target = Target(model, opt, sched, None)
    for step in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()  # type: ignore[no-untyped-call]
        control.boundary(step)
        opt.step()
        sched.step()
        opt.zero_grad()
    assert [r["status"] for r in control.take_outgoing()] == ["delivered", "applied"]
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # the schedule went on


def test_lbfgs_still_evaluates_its_closure_as_often_as_it_needs() -> None:
    def fit(wrapped: bool) -> tuple[int, float]:
        x = torch.tensor([-1.5, 2.0], requires_grad=True)
        opt = torch.optim.LBFGS([x], lr=1, max_iter=50)
        control = Controller()
        if wrapped:
            wrap_optimizer_step(opt, control)
        calls = [0]

        def closure() -> float:
            calls[0] += 1
            opt.zero_grad()
            loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # Rosenbrock
            loss.backward()  # type: ignore[no-untyped-call]
            return float(loss.detach())

        for _ in range(3):
            opt.step(closure)  # type: ignore[arg-type,no-untyped-call]
        return calls[0], float(((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2).detach())

    plain_calls, plain_loss = fit(False)
    wrapped_calls, wrapped_loss = fit(True)
    assert plain_calls > 10 and wrapped_calls == plain_calls and wrapped_loss == plain_loss


def test_finishing_releases_a_paused_training_thread() -> None:
    model, opt, control, _ = setup()
    control.receive(cmd("p", "pause"))
    done = threading.Event()

    def loop() -> None:
        train_step(model, opt, control, 0)
        done.set()

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.3)
    assert not done.is_set() and control.paused
    control.release()  # what run.finish() does first
    thread.join(10)
    assert done.is_set()


def test_a_bare_rollback_goes_back_past_a_snapshot_taken_at_this_step() -> None:
    model, opt, control, _ = setup()
    control.snapshots = Snapshots(every=5, keep=3)
    for step in range(10):
        control.snapshots.maybe_take(step, control.target)
        train_step(model, opt, control, step)
    control.receive(cmd("r", "rollback"))
    control.snapshots.maybe_take(10, control.target)  # a snapshot of the current weights, at this boundary
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, control, 10)
    result = control.take_outgoing()[-1]
    assert result["status"] == "applied" and result["detail"]["restored_step"] == 5
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_rollback_and_an_autopilot_drop_at_one_boundary_drop_one_update() -> None:
    model, opt, control, _ = setup()
    control.snapshots = Snapshots(every=5, keep=3)
    for step in range(7):
        control.snapshots.maybe_take(step, control.target)
        train_step(model, opt, control, step)
    control.receive(cmd("r", "rollback", to_step=5))
    control.drop_this_step = True  # as the autopilot does for a bad step
    train_step(model, opt, control, 7)
    after_rollback = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, control, 8)  # the next step trains again
    assert not all(torch.equal(a, b) for a, b in zip(after_rollback, model.parameters(), strict=True))


def test_a_malformed_command_is_rejected_with_its_reason_and_never_applied() -> None:
    model, opt, control, finals = setup()
    control.receive(Command("m", "", {}, problem="malformed command: kind must be a string, args a map"))
    (result,) = control.take_outgoing()
    assert result["status"] == "rejected" and "malformed command" in result["detail"]["reason"]
    train_step(model, opt, control, 0)
    assert control.take_outgoing() == [] and finals == [] and opt.param_groups[0]["lr"] == 0.1
