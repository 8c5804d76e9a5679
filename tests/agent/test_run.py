"""Run.log on the training thread: never blocks, never raises, counts what it drops.

These tests point the agent at a port where nothing listens: the agent must not care.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import trimtab
from tests.helpers import free_port


@pytest.fixture
def offline_run(tmp_path: Path) -> Iterator[trimtab.Run]:
    run = trimtab.init(
        flush_interval=3600,  # records stay in the buffer where a test can look at them
        server=f"http://127.0.0.1:{free_port()}",
        project="t",
        spool_dir=str(tmp_path / "spool"),
        replay_orphans=False,
    )
    yield run
    run.finish(timeout=0.5)


def test_init_with_no_server_returns_at_once_and_spools(offline_run: trimtab.Run, tmp_path: Path) -> None:
    for step in range(100):
        offline_run.log({"loss": 1.0 / (step + 1)}, step=step)
    assert offline_run.id is None
    assert offline_run.finish(timeout=0.5) is False  # nothing could be acked...
    assert any((tmp_path / "spool").glob("*/seg-*.log"))  # ...so it is all on disk for replay


def test_bad_input_never_raises_and_is_counted(offline_run: trimtab.Run) -> None:
    torch = pytest.importorskip("torch")
    offline_run.log({"ok": 1.0, "text": "not a number", "none": None, "vec": torch.ones(3)}, step=1)
    offline_run.log({"loss": 1.0}, step="seven")  # type: ignore[arg-type]
    offline_run.log({"loss": 1.0}, step=math.inf)  # type: ignore[arg-type]
    offline_run.log({"x" * 1000: 1.0}, step=2)
    offline_run.log({5: 1.0}, step=3)  # type: ignore[dict-item]
    offline_run.log(None)  # type: ignore[arg-type]
    offline_run.log({"loss": 1.0}, step=2**63)  # outside int64: dropped in the sender, not the whole drain
    offline_run.log({"after": 1.0}, step=4)
    offline_run.finish(timeout=0.2)  # the sender validates keys off the training thread
    drops = offline_run.drops.snapshot()
    assert drops == {"bad_value": 3, "bad_step": 3, "bad_key": 2, "bad_data": 1}


def test_accepts_ints_bools_numpy_scalars_and_tensors(offline_run: trimtab.Run) -> None:
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    values = {
        "i": 3,
        "b": True,
        "t": torch.tensor(2.5),
        "t1": torch.tensor([1.5]),
        "nan": math.nan,
        "f32": np.float32(0.25),
        "i64": np.int64(7),
    }
    offline_run.log(values, step=0)
    ((_, _, record),) = list(offline_run._buffer._records)
    assert record == {"i": 3.0, "b": 1.0, "t": 2.5, "t1": 1.5, "nan": record["nan"], "f32": 0.25, "i64": 7.0}
    assert math.isnan(record["nan"]) and offline_run.drops.total() == 0


def test_steps_count_up_when_omitted(offline_run: trimtab.Run) -> None:
    offline_run.log({"a": 1.0}, step=10)
    offline_run.log({"a": 2.0})
    assert offline_run._next_step == 12


def test_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    run = trimtab.init(
        server=f"http://127.0.0.1:{free_port()}",
        spool_dir=str(tmp_path),
        max_queue=10,
        flush_interval=3600,
        replay_orphans=False,
    )
    try:
        for step in range(50):
            run.log({"a": 1.0, "b": 2.0}, step=step)
        assert run.drops.snapshot()["queue_full"] == 2 * 40
    finally:
        run.finish(timeout=0.2)


def test_finished_run_ignores_log(offline_run: trimtab.Run) -> None:
    offline_run.finish(timeout=0.2)
    offline_run.log({"late": 1.0})
    assert offline_run.stats()["queued_records"] == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_forked_child_goes_quiet(offline_run: trimtab.Run) -> None:
    pid = os.fork()
    if pid == 0:  # child: log must not raise and must not queue anything
        try:
            offline_run.log({"child": 1.0}, step=0)
            os._exit(0 if len(offline_run._buffer) == 0 and offline_run.finish() is False else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_importing_trimtab_pulls_in_no_server_dependencies() -> None:
    code = (
        "import sys, trimtab\n"
        "run = trimtab.init(server='http://127.0.0.1:9', spool_dir='off', replay_orphans=False)\n"
        "run.log({'a': 1.0}); run.finish(timeout=0.1)\n"
        "heavy = sorted(m for m in ('fastapi', 'sqlalchemy', 'dash', 'pydantic', 'starlette', 'uvicorn', 'torch')"
        " if m in sys.modules)\n"
        "print(heavy); sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_is_made_storable_and_long_names_truncated(tmp_path: Path) -> None:
    run = trimtab.init(
        server=f"http://127.0.0.1:{free_port()}",
        name="n" * 300,
        spool_dir=str(tmp_path),
        replay_orphans=False,
        config={"path": Path("/data"), "eps": math.inf, "betas": (0.9, 0.95)},
    )
    try:
        assert run.identity.config == {"path": "/data", "eps": "Infinity", "betas": [0.9, 0.95]}  # trimtab.jsonsafe
        assert run.identity.name == "n" * 256
    finally:
        run.finish(timeout=0.2)


def test_finish_does_not_hang_while_the_server_is_down(tmp_path: Path) -> None:
    run = trimtab.init(server=f"http://127.0.0.1:{free_port()}", spool_dir=str(tmp_path), replay_orphans=False)
    run.log({"loss": 1.0}, step=0)
    # An hour-long timeout: returning at all (within pytest's per-test timeout) shows that an
    # unreachable server with everything spooled ends finish() early.
    assert run.finish(timeout=3600) is False
    assert any(tmp_path.glob("*/seg-*.log"))


def test_accelerator_tensors_are_read_by_the_sender_not_in_log(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    run = trimtab.init(
        server=f"http://127.0.0.1:{free_port()}", spool_dir=str(tmp_path), replay_orphans=False, flush_interval=3600
    )
    try:
        device_value = torch.empty((), device="meta")  # not on the CPU, like a CUDA tensor
        run.log({"loss": device_value, "lr": 0.1}, step=0)
        ((_, _, record),) = list(run._buffer._records)
        assert record["loss"] is not device_value and isinstance(record["loss"], torch.Tensor)  # detached, deferred
        assert record["lr"] == 0.1
    finally:
        run.finish(timeout=0.5)
    assert run.drops.snapshot() == {"bad_value": 1}  # a meta tensor has no value to read, unlike a CUDA one


def test_nul_and_huge_integers_in_config_and_names_are_made_storable(tmp_path: Path) -> None:
    run = trimtab.init(
        server=f"http://127.0.0.1:{free_port()}",
        project="p\x00q",
        name="a\x00b",
        spool_dir=str(tmp_path),
        replay_orphans=False,
        config={"k\x00": "v\x00", "big": 2**70},
    )
    try:
        assert (run.identity.project, run.identity.name) == ("pq", "ab")
        assert run.identity.config == {"k": "v", "big": str(2**70)}
    finally:
        run.finish(timeout=0.2)


def offline_watched(tmp_path: Path, **options: Any) -> tuple[trimtab.Run, Any, Any]:
    """A run whose server never answers (everything stays in its buffer, readable by the
    test), watching a small Linear model and its SGD optimizer."""
    import torch

    run = trimtab.init(
        server=f"http://127.0.0.1:{free_port()}",
        spool_dir=str(tmp_path),
        replay_orphans=False,
        flush_interval=3600,
        **options,
    )
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run.watch(model, opt, sample_every=1000)
    return run, model, opt


def test_the_lr_logged_for_a_step_is_the_one_its_update_used(tmp_path: Path) -> None:
    """A command applied at step 5's boundary changes step 5's update, and lr/group0 says so."""
    torch = pytest.importorskip("torch")
    from trimtab.protocol import Command

    run, model, opt = offline_watched(tmp_path)
    try:
        for step in range(8):
            for group in opt.param_groups:
                group["lr"] = 0.1 + 0.01 * step  # the script owns the LR
            if step == 5:
                run._control.receive(Command("r", "reduce_lr", {"factor": 0.5}))
            model(torch.ones(4, 2)).sum().backward()
            run.step(None)
            opt.step()
            opt.zero_grad()
        logged = {s: r["lr/group0"] for s, _, r in run._buffer._records if "lr/group0" in r}
        want = {s: (0.1 + 0.01 * s) * (0.5 if s >= 5 else 1.0) for s in range(8)}
        assert logged == pytest.approx(want)
        assert run.learning_rates() == pytest.approx([0.17 * 0.5])
    finally:
        run.finish(timeout=0.2)


def test_the_steps_whose_update_was_skipped_are_logged(tmp_path: Path) -> None:
    """skip_batches n=2 at step 3 drops the updates of steps 3 and 4: update_skipped says so
    there (a chart marker), and nowhere else; the weights confirm it."""
    torch = pytest.importorskip("torch")
    from trimtab.protocol import Command

    run, model, opt = offline_watched(tmp_path)
    try:
        weights = []
        for step in range(7):
            if step == 3:
                run._control.receive(Command("s", "skip_batches", {"n": 2}))
            model(torch.ones(4, 2)).sum().backward()
            run.step(None)
            opt.step()
            opt.zero_grad()
            weights.append(model.weight.detach().clone())
        skipped = sorted(s for s, _, r in run._buffer._records if "update_skipped" in r)
        assert skipped == [3, 4]
        assert torch.equal(weights[2], weights[3]) and torch.equal(weights[3], weights[4])
        assert not torch.equal(weights[4], weights[5])
    finally:
        run.finish(timeout=0.2)


def test_a_resumed_script_continues_its_step_numbers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    run, model, _ = offline_watched(tmp_path, start_step=400)  # the checkpoint's iteration
    try:
        for _ in range(3):
            model(torch.ones(4, 2)).sum().backward()
            run.step(model.weight.sum())
            run.log({"tokens_seen": 1.0})  # at the step run.step was given
        loss_steps = sorted(s for s, _, r in run._buffer._records if "loss" in r)
        assert loss_steps == [400, 401, 402]
        assert sorted(s for s, _, r in run._buffer._records if "tokens_seen" in r) == [400, 401, 402]
    finally:
        run.finish(timeout=0.2)
    with pytest.raises(ValueError, match="start_step"):
        trimtab.init(server="http://127.0.0.1:1", start_step=-1)
