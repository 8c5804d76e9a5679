"""Where a NaN or Inf came from, found only on the step where it appeared, and the
``nonfinite`` event that says so (:func:`nonfinite_report`).

Healthy steps pay nothing here. When a step's loss or gradient norm is non-finite, the
watcher calls :func:`replay_forward` with that step's inputs (captured by reference by a
forward pre-hook on the watched model): the forward pass runs again without gradients,
with a hook on every module, and reports the first module in forward order whose output
is non-finite although its inputs were finite (where the bad values were *born*). Module
buffers (BatchNorm running statistics) and the RNG state are restored afterwards, so the
replay leaves no trace on training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from trimtab.activations import first_tensor


def tensor_summary(t: torch.Tensor) -> dict[str, Any]:
    """Counts of NaN/+Inf/-Inf and the finite range of ``t`` (this reads from the device)."""
    x = t.detach()
    if x.is_sparse:
        x = x.coalesce().values()
    if x.is_complex():
        x = torch.view_as_real(x)
    x = x.reshape(-1).float()
    finite = torch.isfinite(x)
    n_finite = int(finite.sum())
    out: dict[str, Any] = {
        "numel": x.numel(),
        "nan": int(torch.isnan(x).sum()),
        "pinf": int((x == math.inf).sum()),
        "ninf": int((x == -math.inf).sum()),
    }
    if n_finite:
        values = x[finite]
        out["finite_max_abs"] = float(values.abs().max())
        out["finite_mean"] = float(values.mean())
    return out


def all_finite(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        if not (obj.is_floating_point() or obj.is_complex()) or obj.numel() == 0:
            return True
        return bool(torch.isfinite(obj).all())
    if isinstance(obj, (tuple, list)):
        return all(all_finite(o) for o in obj)
    if isinstance(obj, dict):
        return all(all_finite(o) for o in obj.values())
    return True


def replay_forward(model: nn.Module, inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> dict[str, Any]:
    """Run ``model(*args, **kwargs)`` again under no_grad for each kept micro-batch, in order,
    and report the first module whose output went non-finite. Returns the event's ``forward``."""
    names = {m: (n or "model") for n, m in model.named_modules()}
    found: dict[str, Any] = {}
    order = 0

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal order
        order += 1
        if "born" in found:
            return
        out = first_tensor(output)
        if out is None or all_finite(out):
            return
        where = {"module": names.get(module, type(module).__name__), "output": tensor_summary(out)}
        found.setdefault("first", where)
        if all_finite(args):
            found["born"] = where

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = {t.device.index for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        devices.add(torch.cuda.current_device())
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    outputs_finite = True
    replayed = 0
    try:
        with torch.random.fork_rng(devices=sorted(d for d in devices if d is not None)), torch.no_grad():
            for args, kwargs in inputs:
                replayed += 1
                outputs_finite = all_finite(model(*args, **kwargs)) and outputs_finite
                if found:
                    break
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    result: dict[str, Any] = {"replayed": True, "micro_batches": replayed, "modules_run": order}
    where = found.get("born") or found.get("first")
    if where is None:
        result["finite"] = outputs_finite
        return result
    result.update(where, finite=False, inputs_finite="born" in found, micro_batch=replayed - 1)
    return result


MAX_LISTED_PARAMS = 20


def replay_safe(model: nn.Module) -> bool:
    """False for models whose forward runs collectives (FSDP, DTensor parameters): replaying it
    on the ranks that saw a NaN alone would hang the job."""
    sharded = ("FullyShardedDataParallel", "FSDPModule")
    if any(cls.__name__ in sharded for m in model.modules() for cls in type(m).__mro__):
        return False
    return not any(type(p).__name__ == "DTensor" for p in model.parameters())


def nonfinite_report(
    model: nn.Module,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    forward_rank: dict[str, int],
    *,
    replay: bool,
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]],
    live: bool,
    loss: float | None,
    total: float | None,
    grad_index: list[int],
    norms: Sequence[float],
) -> dict[str, Any]:
    """The ``nonfinite`` event's data for a step whose loss or total gradient norm read back
    non-finite: the first parameter (in backward order) whose gradient did, the replay's first
    module, and the verdict ``source``. ``live``: read back within its own ``run.step``, so
    gradients and weights are as they were (always so on the CPU). ``forward_rank``: module
    name -> position in the forward pass, learnt from the activation hooks."""
    data: dict[str, Any] = {"loss": loss, "grad_norm_total": total}
    bad = [i for i, v in zip(grad_index, norms, strict=False) if not math.isfinite(v)]
    bad.sort(key=lambda i: _backward_position(names[i], i, forward_rank))
    if bad:
        first = bad[0]
        grad = params[first].grad
        summary = tensor_summary(grad) if live and grad is not None else {}
        data["backward"] = {"param": names[first], "grad": summary}
        data["nonfinite_params"] = [names[i] for i in bad[:MAX_LISTED_PARAMS]]
        data["n_nonfinite_params"] = len(bad)
    forward: dict[str, Any] = {"replayed": False}
    if not live and not all_finite(params):
        # On a GPU the values land after the optimizer stepped: it has spread the NaN into
        # the weights, and a replay would blame whichever layer runs first.
        forward["reason"] = "weights are non-finite since the optimizer step"
        data["weights_finite"] = False
    elif not replay:
        forward["reason"] = "replay is off for this model (sharded parameters or replay_on_nonfinite=False)"
    elif inputs:
        data["batch_finite"] = all_finite(inputs)
        try:
            forward = replay_forward(model, inputs)
            forward["weights_updated_since"] = not live
        except Exception as exc:
            forward = {"replayed": False, "error": repr(exc)[:500]}
    else:
        forward["reason"] = "no inputs kept: the watched module's own forward was not called this step"
    data["forward"] = forward
    data["module"] = forward.get("module")
    data["param"] = data.get("backward", {}).get("param")
    if data.get("batch_finite") is False:
        data["source"] = "batch"  # the inputs themselves held NaN/Inf
    elif data["module"] is not None or (loss is not None and not math.isfinite(loss)):
        data["source"] = "forward"
    elif bad or (total is not None and not math.isfinite(total)):
        data["source"] = "backward"  # per-parameter norms may be off on this step: the total tells
    else:
        data["source"] = "unknown"
    return data


def _backward_position(name: str, i: int, forward_rank: dict[str, int]) -> tuple[int, int]:
    """Sort key: gradients are produced in reverse forward order; unknown modules go by
    reverse registration order."""
    module = name.rsplit(".", 1)[0] if "." in name else "model"
    rank = forward_rank.get(module)
    return (0, -rank) if rank is not None else (1, -i)
