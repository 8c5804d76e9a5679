"""Where a NaN or Inf came from, found only on the step where it appeared.

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
