"""The largest pre-softmax attention logit of each attention module, on sampled steps only.

``arm()`` (before a sampled step's forward) installs, and ``collect()`` removes:

* a forward pre-hook on each ``nn.MultiheadAttention``, which recomputes q and k from the
  module's inputs with its own in-projection;
* forward pre- and post-hooks on the watched model and on every module whose class is not
  torch's own (torch's layers never call attention themselves), keeping a per-thread stack of
  the modules in forward. While that stack is not empty a ``TorchFunctionMode`` is on, which
  sees every call of ``F.scaled_dot_product_attention`` however it was imported and charges
  it to the innermost module in forward.

The logit is scale * q.k (plus a float mask) over the positions not masked out, computed in
float32 over blocks of queries (never a whole (B, H, T, T) tensor) under ``no_grad``, and kept
as a device tensor: the maximum over the step's forward passes with gradients enabled (so
every micro-batch of gradient accumulation, no validation pass, no activation-checkpointing
recompute). Unarmed, nothing is installed. A failure is warned about once and ends probing.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

LOGIT_CHUNK = 1 << 22  # float32 logits per block of queries (16 MiB)
_SDPA = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights")
_graph_task_id: Callable[[], int] | None = getattr(torch._C, "_current_graph_task_id", None)


def logit_key(module: str) -> str:
    return f"attn/{module}/max_logit"


@dataclass
class Logits:
    names: list[str] = field(default_factory=list)  # first seen first
    maxima: list[torch.Tensor] = field(default_factory=list)  # float32, 0-d, on the device
    seconds: float = 0.0


def max_logit(
    q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor | None:
    """The largest ``scale * q.k`` (+ ``mask``) over the positions attention may use, with
    ``F.scaled_dot_product_attention``'s conventions: q (..., Hq, L, E) and k (..., Hk, S, E)
    with Hq a multiple of Hk (grouped-query attention), a boolean mask True where attention is
    allowed or a float one added to the logits, ``causal`` aligned top-left. None when there
    is nothing to measure (an empty or non-float input, a nested tensor)."""
    if q.is_nested or k.is_nested or not q.is_floating_point() or q.dim() < 2 or k.dim() < 2:
        return None
    q, k, mask = _four_dims(q, k, mask)
    batch, heads, length, dim = q.shape
    kv_heads, keys = k.shape[-3], k.shape[-2]
    if length == 0 or keys == 0 or heads % kv_heads:
        return None
    group = heads // kv_heads
    kt = k.float().transpose(-2, -1)
    if group > 1:
        kt = kt.unsqueeze(2)  # (B, Hk, 1, E, S): each key head serves `group` query heads
    rows = max(1, LOGIT_CHUNK // max(1, batch * heads * keys))
    best = torch.full((), -math.inf, dtype=torch.float32, device=q.device)
    for at in range(0, length, rows):
        qc = q[..., at : at + rows, :].float()
        n = qc.shape[-2]
        if group > 1:
            logits = torch.matmul(qc.reshape(batch, kv_heads, group, n, dim), kt).reshape(batch, heads, n, keys)
        else:
            logits = torch.matmul(qc, kt)
        logits.mul_(scale)
        if mask is not None:
            part = mask if mask.dim() < 2 or mask.shape[-2] == 1 else mask[..., at : at + n, :]
            logits = logits.masked_fill(~part, -math.inf) if part.dtype == torch.bool else logits + part.float()
        if causal:
            query_at = torch.arange(at, at + n, device=q.device).unsqueeze(-1)
            logits.masked_fill_(torch.arange(keys, device=q.device) > query_at, -math.inf)
        best = torch.maximum(best, logits.amax())
    return best


def _four_dims(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, H, L, E) views: a missing head dimension added, several batch dimensions merged."""
    while q.dim() < 4:
        q, k = q.unsqueeze(-3), k.unsqueeze(-3)
        if mask is not None and mask.dim() >= 3:
            mask = mask.unsqueeze(-3)
    if q.dim() > 4:
        lead = q.shape[:-3]
        k = k.expand(*lead, *k.shape[-3:]).reshape(-1, *k.shape[-3:])
        if mask is not None and mask.dim() > 3:
            mask = mask.reshape((1,) * (q.dim() - mask.dim()) + tuple(mask.shape))
            mask = mask.expand(*lead, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])
        q = q.reshape(-1, *q.shape[-3:])
    return q, k, mask


def mha_max_logit(module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``max_logit`` of one ``nn.MultiheadAttention`` call, from the call's arguments: q and k
    by the module's in-projection (in float32), its ``bias_k`` and ``add_zero_attn`` key
    positions appended, its masks (True = masked out there) turned into additive ones."""
    given = dict(zip(_MHA_ARGS, args, strict=False)) | kwargs
    query, key = given["query"], given["key"]
    padding, mask = given.get("key_padding_mask"), given.get("attn_mask")
    if query.is_nested or key.is_nested:
        return None
    if query.dim() == 2:  # unbatched
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        padding = None if padding is None else padding.unsqueeze(0)
    elif module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    length, batch, embed = query.shape
    heads = module.num_heads
    head_dim = embed // heads
    if module.in_proj_weight is not None:
        w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed : 2 * embed]
    else:  # kdim or vdim differ from embed_dim: separate projections
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    b_q = b_k = None
    if module.in_proj_bias is not None:
        b_q, b_k = module.in_proj_bias[:embed].float(), module.in_proj_bias[embed : 2 * embed].float()
    q = F.linear(query.float(), w_q.float(), b_q)
    k = F.linear(key.float(), w_k.float(), b_k)
    if module.bias_k is not None:
        k = torch.cat([k, module.bias_k.float().expand(1, batch, embed)])
    q = q.reshape(length, batch, heads, head_dim).permute(1, 2, 0, 3)
    k = k.reshape(k.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
    keys = k.shape[2]
    added = None
    if mask is not None:
        added = _additive(mask, keys)
        if added.dim() == 3:  # (batch * heads, L, S)
            added = added.reshape(batch, heads, length, keys)
    if padding is not None:
        pad = _additive(padding, keys).reshape(batch, 1, 1, keys)
        added = pad if added is None else added + pad
    # MHA refuses is_causal without an attn_mask (it is a hint that the mask is causal).
    return max_logit(q, k, 1.0 / math.sqrt(head_dim), added)


def _additive(mask: torch.Tensor, keys: int) -> torch.Tensor:
    """An MHA mask as float32 logits to add (True, masked out, as -inf), padded with zeros
    for the key positions the module appends."""
    if mask.dtype == torch.bool:
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask, -math.inf)
    else:
        out = mask.float()
    return F.pad(out, (0, keys - out.shape[-1])) if out.shape[-1] < keys else out


def _recording() -> bool:
    """A forward pass that trains: gradients on and not inside backward (where activation
    checkpointing recomputes the forward)."""
    return torch.is_grad_enabled() and (_graph_task_id is None or _graph_task_id() == -1)


@contextlib.contextmanager
def _quiet(device: torch.device) -> Iterator[None]:
    """No autograd graph, and float32 kept under an autocast the user's forward runs in."""
    with torch.no_grad():
        if device.type in ("cpu", "cuda"):
            with torch.autocast(device.type, enabled=False):
                yield
        else:
            yield


class _Intercept(TorchFunctionMode):
    """Passes every torch function through; shows each scaled_dot_product_attention call
    to ``seen`` first."""

    def __init__(self, seen: Callable[[tuple[Any, ...], dict[str, Any]], None]) -> None:
        super().__init__()
        self._seen = seen

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        if func is _SDPA:
            self._seen(args, kwargs)
        return func(*args, **kwargs)


def _remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off this thread's torch-function mode stack wherever it is; modes the
    forward pushed above it and left on stay on, in their order."""
    depth = torch._C._len_torch_function_stack()
    if not any(torch._C._get_function_stack_at(i) is mode for i in range(depth)):
        return
    above = []
    while (top := torch._C._pop_torch_function_stack()) is not mode:
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)


def _builtin(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.")


class AttentionProbe:
    def __init__(self, model: nn.Module, warn: Callable[[str, str], None]) -> None:
        self.model = model
        self._warn = warn
        self._handles: list[RemovableHandle] = []
        self._maxima: dict[str, torch.Tensor] = {}
        self._seconds = 0.0
        self._broken = False
        self._mode = _Intercept(self._on_sdpa)
        self._local = threading.local()  # .stack: the tracked modules in forward on this thread
        self._lock = threading.Lock()  # DataParallel replicas run forward on worker threads

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if self._handles or self._broken:
            return
        self._maxima, self._seconds = {}, 0.0
        for name, module in self.model.named_modules():
            name = name or "model"
            if isinstance(module, nn.MultiheadAttention):
                pre = module.register_forward_pre_hook(self._mha_hook(name), with_kwargs=True)
            elif module is self.model or not _builtin(module):
                pre = module.register_forward_pre_hook(self._enter_hook(name))
            else:
                continue
            self._handles += [pre, module.register_forward_hook(self._leave, always_call=True)]

    def collect(self) -> Logits:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _remove_mode(self._mode)  # left on only if a forward ended abnormally
        self._local = threading.local()
        seen = Logits(list(self._maxima), list(self._maxima.values()), self._seconds)
        self._maxima, self._seconds = {}, 0.0
        return seen

    # ------------------------------------------------------------------ hooks
    def _stack(self) -> list[tuple[nn.Module, str]]:
        stack: list[tuple[nn.Module, str]] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _enter(self, module: nn.Module, name: str) -> bool:
        """Push ``module``; the outermost one turns the mode on. False when not recording."""
        stack = self._stack()
        if not stack:
            if self._broken or not _recording():
                return False
            torch._C._push_on_torch_function_stack(self._mode)
        stack.append((module, name))
        return True

    def _enter_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._enter(module, name)

        return hook

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack = self._stack()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] is module:
                del stack[i:]
                if not stack:
                    _remove_mode(self._mode)
                return

    def _mha_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self._enter(module, name) or self._broken or not _recording():
                return
            mha = cast(nn.MultiheadAttention, module)

            def compute() -> torch.Tensor | None:
                with _quiet(mha.out_proj.weight.device):
                    return mha_max_logit(mha, args, kwargs)

            self._measure(name, compute)

        return hook

    def _on_sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stack = self._stack()
        # Inside an MHA its own hook measured the call (its F.multi_head_attention_forward
        # is a torch function too, so the mode does not see the SDPA call within it anyway).
        if not stack or isinstance(stack[-1][0], nn.MultiheadAttention) or self._broken or not _recording():
            return

        def compute() -> torch.Tensor | None:
            given = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs
            q, scale = given["query"], given.get("scale")
            with _quiet(q.device):
                return max_logit(
                    q,
                    given["key"],
                    1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                    given.get("attn_mask"),
                    bool(given.get("is_causal", False)),
                )

        self._measure(stack[-1][1], compute)

    def _measure(self, name: str, compute: Callable[[], torch.Tensor | None]) -> None:
        """Run one logit computation (reading the call's arguments included): timed for the
        overhead governor, recorded, and never raising into the forward pass (a failure
        stops the probe)."""
        start = time.perf_counter()
        try:
            value = compute()
            if value is not None:
                self._record(name, value)
        except Exception as exc:
            self._fail(name, exc)
        finally:
            self._seconds += time.perf_counter() - start

    def _record(self, name: str, value: torch.Tensor) -> None:
        with self._lock:
            seen = self._maxima.get(name)
            self._maxima[name] = value if seen is None else torch.maximum(seen, value.to(seen.device))

    def _fail(self, name: str, exc: Exception) -> None:
        self._broken = True
        self._warn("attn-logits", f"attention logits of module {name!r} failed ({exc!r}); not measured from now on")
