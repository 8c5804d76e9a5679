"""``run.watch(model, optimizer)`` and ``run.step(loss)``: what the agent measures each step.

Every step (no host-device synchronisation): the loss, the total gradient norm before
clipping, one gradient norm per parameter (one ``torch._foreach_norm`` call), the learning
rate of each param group, the loss scale, the step time and throughput, and a 0/1
``nonfinite`` flag. The numbers are packed into one device tensor and copied to the host
asynchronously (see ``transfer.py``); they are logged when the copy has landed.

Every ``sample_every`` steps (100 by default) also: weight norms, the update ratio
||dW|| / ||W|| per parameter, weight and gradient histograms, activation statistics from
forward hooks and the largest attention logit per attention module (``attention.py``), from
hooks that exist only for that step's forward pass.

A non-finite loss or gradient norm triggers NaN provenance (``provenance.py``) once per
streak of non-finite steps, and an event that is never dropped. The agent times itself and,
past its overhead budget, samples less often (``overhead.py``); it says so in an event.

Key names are documented in ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from trimtab.activations import STATS, ActivationProbe, default_modules
from trimtab.attention import AttentionProbe, logit_key
from trimtab.histogram import Summary, histogrammable, summarize
from trimtab.overhead import Governor, OverheadMeter
from trimtab.protocol import EVENT_NONFINITE, EVENT_OVERHEAD_GOVERNOR
from trimtab.provenance import nonfinite_report, replay_safe
from trimtab.transfer import Transfers
from trimtab.update_ratio import UpdateRatios
from trimtab.watch_options import WatchOptions as WatchOptions  # re-exported: trimtab.watch.WatchOptions

if TYPE_CHECKING:
    from torch.optim import Optimizer

logger = logging.getLogger("trimtab")


class Sink(Protocol):
    """What the watcher needs from a Run."""

    rank: int

    def emit_scalars(self, step: int, wall: float, record: dict[str, float]) -> None: ...
    def emit_histogram(self, key: str, step: int, wall: float, summary: list[int], lo: float, width: float) -> None: ...
    def emit_event(self, kind: str, step: int | None, data: dict[str, Any], level: str = "info") -> None: ...
    def warn_once(self, topic: str, message: str) -> None: ...


Inputs = tuple[tuple[Any, ...], dict[str, Any]]
MAX_KEPT_INPUTS = 64  # micro-batches of one optimizer step kept (by reference) for NaN replay


@dataclass
class StepInfo:
    step: int
    wall: float
    host: dict[str, float]  # values known on the host already (lr, timing)
    has_loss: bool
    grad_index: list[int]  # which parameters had a gradient, in the order of the norms
    inputs: list[Inputs]


class Watcher:
    def __init__(
        self,
        sink: Sink,
        model: nn.Module,
        optimizer: Optimizer | None,
        scheduler: Any,
        scaler: Any,
        opts: WatchOptions,
        next_step: int = 0,
    ) -> None:
        self.sink = sink
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler  # for the control commands (reduce_lr) of the next issue
        self.scaler = scaler
        self.opts = opts
        self.sample_every = opts.sample_every
        self.per_param = opts.param_grad_norms
        named = list(model.named_parameters())
        self.names = [n for n, p in named if p.requires_grad]
        self.params = [p for _, p in named if p.requires_grad]
        if not named:
            sink.warn_once("watch-empty", "run.watch: the model has no parameters; only loss, lr and timing are logged")
        elif not self.params:
            sink.warn_once("watch-frozen", "run.watch: every parameter is frozen; no gradient statistics")
        self.grad_keys = [f"grad_norm/{n}" for n in self.names]
        self.is_matrix = [p.ndim >= 2 for p in self.params]  # weight matrices, for the depth ratio
        self.head: torch.Tensor | None = None
        self.head_has = (False, False)  # which of head's loss and grad norm are real (not NaN fill)
        self.send_histograms = opts.histograms and (sink.rank == 0 or opts.all_ranks_histograms)
        modules = [
            (name, m)
            for name, m in default_modules(model)
            if opts.activation_modules is None or opts.activation_modules(name, m)
        ]
        self.probe = (
            ActivationProbe(modules, opts.bins, self.send_histograms, sink.warn_once)
            if opts.activations and modules
            else None
        )
        self.attention = AttentionProbe(model, sink.warn_once) if opts.attention_logits else None
        self._probes = [p for p in (self.probe, self.attention) if p is not None]  # armed for sampled steps
        self.transfers = Transfers()
        self._replay_ok = opts.replay_on_nonfinite and replay_safe(model)
        self.meter = OverheadMeter(report_every=opts.sample_every)
        self.governor = Governor(opts.overhead_budget)
        self._nan: dict[torch.device, torch.Tensor] = {}  # the "absent" entries of the step tensor
        self._norm_kwargs = _foreach_norm_kwargs()
        self._forward_rank: dict[str, int] = {}
        self._last_start: float | None = None
        self._last_sampled = False
        self._last_step: int | None = None
        self._streak = 0
        self._inputs: list[Inputs] = []  # every grad-enabled forward since the last step
        self._current: int | None = None  # the step run.step is handling, while it runs
        self._handles = [model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)]
        self.ratios: UpdateRatios | None = None
        if optimizer is not None and opts.update_ratio and self.params:
            self.ratios = UpdateRatios(
                self.names, self.params, self.transfers, self.meter, sink.emit_scalars, sink.warn_once
            )
            self._handles.append(optimizer.register_step_post_hook(self.ratios.after_optimizer_step))
        if next_step % self.sample_every == 0:
            for probe in self._probes:
                probe.arm()

    # ------------------------------------------------------------------ hooks
    def _capture_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and len(self._inputs) < MAX_KEPT_INPUTS:
            self._inputs.append((args, kwargs))  # references only: kept for NaN provenance

    # ------------------------------------------------------------------ the step
    def step(self, loss: Any, step: int, batch_size: int | None, tokens: int | None) -> None:
        start = time.perf_counter()
        self._current = step
        try:
            self._step(start, loss, step, batch_size, tokens)
        finally:
            self._current = None
            if (step + 1) % self.sample_every == 0:
                for probe in self._probes:
                    probe.arm()
            self._last_start = start
            self.meter.add(time.perf_counter() - start)

    def _step(self, start: float, loss: Any, step: int, batch_size: int | None, tokens: int | None) -> None:
        wall_since = None if self._last_start is None else start - self._last_start
        self.meter.close_step(wall_since, self._last_sampled)
        self.transfers.poll()
        if self.ratios is not None:  # whatever a sampled step captured, its optimizer step is over
            self.ratios.forget()
        sampled = step % self.sample_every == 0
        self._last_sampled = sampled
        wall = time.time()
        host: dict[str, float] = {}  # the LRs are logged by the optimizer's step (control.py)
        if wall_since is not None and self._last_step is not None and step == self._last_step + 1:
            host["perf/step_time_s"] = wall_since
            samples = batch_size or self.opts.batch_size
            n_tokens = tokens or self.opts.tokens_per_step
            if samples:
                host["perf/samples_per_s"] = samples / wall_since
            if n_tokens:
                host["perf/tokens_per_s"] = n_tokens / wall_since
        self._last_step = step

        head: list[torch.Tensor] = []
        self.head = None
        loss_t = self._loss_tensor(loss, host)
        grads, index = self._grads()
        norms: torch.Tensor | None = None
        device = grads[0].device if grads else (loss_t.device if loss_t is not None else None)
        if grads:
            norms = self._norms(grads, device)
            scale = self._grad_scale()
            if scale is not None:
                norms = norms / scale.to(norms.device)
            total = torch.linalg.vector_norm(norms)
        per_param = self.per_param or sampled
        if device is not None:
            nan = self._nan.get(device)
            if nan is None:
                nan = self._nan[device] = torch.full((), math.nan, device=device)
            head = [loss_t.float() if loss_t is not None else nan, total if norms is not None else nan]
            scale_t = self._loss_scale()
            head.append(scale_t.to(device).float() if scale_t is not None else nan)
            parts = [torch.stack([h.to(device) for h in head])]
            self.head = parts[0]  # [loss, total grad norm, loss scale] on the device, for the autopilot
            self.head_has = (loss_t is not None, norms is not None)
            if norms is not None and per_param:
                parts.append(norms.to(device))
            info = StepInfo(step, wall, host, loss_t is not None, index, self._inputs)
            self._inputs = []
            self.transfers.submit([torch.cat(parts)], lambda values: self._emit_step(info, values[0]))
        else:  # no tensors at all: a loss given as a number, no gradients
            if "loss" in host:
                host["nonfinite"] = 0.0 if math.isfinite(host["loss"]) else 1.0
            self.sink.emit_scalars(step, wall, host)
            self._inputs = []
        if sampled:
            self._sample(step, wall, grads, index)
        else:  # probes armed for a step that was not sampled (explicit steps): discard
            for probe in self._probes:
                if probe.armed:
                    probe.collect()
        if self.meter.due():
            self._report_overhead(step)

    def _loss_tensor(self, loss: Any, host: dict[str, float]) -> torch.Tensor | None:
        if loss is None:
            return None
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                self.sink.warn_once("loss-shape", f"run.step: loss has {loss.numel()} elements; logging its mean")
                return loss.detach().float().mean()
            return loss.detach().reshape(())
        try:
            host["loss"] = float(loss)
        except (TypeError, ValueError):
            self.sink.warn_once("loss-type", f"run.step: cannot read a loss of type {type(loss).__name__}")
        return None

    def _grads(self) -> tuple[list[torch.Tensor], list[int]]:
        grads, index = [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is not None:
                grads.append(g)
                index.append(i)
        if self.params and not grads:
            self.sink.warn_once(
                "no-grads", "run.step: no parameter has a gradient; call it after backward() and before zero_grad()"
            )
        return grads, index

    def _norms(self, grads: list[torch.Tensor], device: torch.device | None) -> torch.Tensor:
        norms: Sequence[torch.Tensor]
        if all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in grads):
            # On the CPU a BLAS dot per tensor reads memory faster than _foreach_norm (2.2 vs
            # 3.2 ms for 7.4 M gradients on 2 threads); the norm is the same float32 sum.
            flat = [g.view(-1) for g in grads]
            return torch.stack([torch.dot(f, f) for f in flat]).sqrt_()
        if not any(g.is_sparse for g in grads):
            norms = _foreach_norms(grads, self._norm_kwargs)
        else:  # sparse gradients (nn.Embedding(sparse=True)): one by one
            norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g).float() for g in grads]
        target = device or norms[0].device
        return torch.stack([n.float().to(target) for n in norms])

    def _grad_scale(self) -> torch.Tensor | None:
        """The GradScaler's scale when the gradients are still scaled (no unscale_ yet)."""
        scaler, optimizer = self.scaler, self.optimizer
        if scaler is None or optimizer is None or not scaler.is_enabled():
            return None
        state = scaler._per_optimizer_states.get(id(optimizer))
        if state is not None and getattr(state.get("stage"), "name", "") == "UNSCALED":
            return None
        scale: torch.Tensor | None = scaler._scale
        return scale

    def _scaling(self) -> bool:
        return self.scaler is not None and bool(self.scaler.is_enabled())

    def _loss_scale(self) -> torch.Tensor | None:
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale: torch.Tensor | None = scaler._scale
        return scale

    # ------------------------------------------------------------------ sampled steps
    def _sample(self, step: int, wall: float, grads: list[torch.Tensor], index: list[int]) -> None:
        seen = self.probe.collect() if self.probe is not None else None
        logits = self.attention.collect() if self.attention is not None else None
        self.meter.add((seen.seconds if seen is not None else 0.0) + (logits.seconds if logits is not None else 0.0))
        if seen is not None and seen.names:
            self._forward_rank = {name: i for i, name in enumerate(seen.names)}
        tensors: list[torch.Tensor] = []
        layout: dict[str, Any] = {}
        with torch.no_grad():
            if self.params:
                norms = _foreach_norms([p.detach() for p in self.params], self._norm_kwargs)
                dev = norms[0].device
                layout["weight_norms"] = len(tensors)
                tensors.append(torch.stack([n.float().to(dev) for n in norms]))
            if seen is not None and seen.stats:
                layout["acts"] = (len(tensors), seen.names)
                dev = seen.stats[0].device
                tensors.append(torch.stack([s.to(dev) for s in seen.stats]))
            if logits is not None and logits.maxima:
                layout["attn"] = (len(tensors), logits.names)
                tensors.append(torch.stack([m.to(logits.maxima[0].device) for m in logits.maxima]))
            hist_keys: list[str] = []
            summaries: list[Summary] = []
            if self.send_histograms:
                for name, p in zip(self.names, self.params, strict=True):
                    if histogrammable(p):
                        hist_keys.append(f"weights/{name}")
                        summaries.append(summarize(p, self.opts.bins))
                scale = self._grad_scale()
                for i, g in zip(index, grads, strict=True):
                    if not g.is_sparse and histogrammable(g):
                        hist_keys.append(f"grads/{self.names[i]}")
                        summary = summarize(g, self.opts.bins)
                        if scale is not None:  # still scaled by the GradScaler: bins scale with it
                            summary = Summary(summary.counts, summary.span / scale.to(summary.span.device))
                        summaries.append(summary)
                if seen is not None:
                    hist_keys.extend(f"acts/{n}" for n in seen.names[: len(seen.hists)])
                    summaries.extend(seen.hists)
            if summaries:
                dev = summaries[0].counts.device
                span_dtype = torch.float64 if dev.type == "cpu" else torch.float32
                layout["hists"] = (len(tensors), hist_keys)
                tensors.append(torch.stack([s.counts.to(dev) for s in summaries]))
                tensors.append(torch.stack([s.span.to(dev, span_dtype) for s in summaries]))
            if self.ratios is not None:
                self.ratios.capture(step, wall)
        if tensors:
            self.transfers.submit(tensors, lambda host: self._emit_sample(step, wall, layout, host))

    # ------------------------------------------------------------------ emitting (host values)
    def _emit_step(self, info: StepInfo, values_t: torch.Tensor) -> None:
        values = values_t.tolist()
        record = dict(info.host)
        loss, total, scale = values[0], values[1], values[2]
        if info.has_loss:
            record["loss"] = loss
        if info.grad_index:
            record["grad_norm/total"] = total
        if not math.isnan(scale):
            record["loss_scale"] = scale
        norms = values[3:]
        if norms:
            keys = self.grad_keys
            record.update({keys[i]: v for i, v in zip(info.grad_index, norms, strict=True)})
            ratio = self._depth_ratio(info.grad_index, norms)
            if ratio is not None:
                record["grad_norm/depth_ratio"] = ratio
        loss_value = record.get("loss")
        loss_bad = loss_value is not None and not math.isfinite(loss_value)
        grads_bad = bool(info.grad_index) and not math.isfinite(total)
        if self._scaling() and grads_bad and not loss_bad:
            # A GradScaler overflow: expected now and then in fp16; the scaler skips the step.
            # Its gradient norms are inf/NaN by construction and say nothing about the run, so
            # they are left out (a non-finite-gradient alert on every routine skip is noise).
            record = {k: v for k, v in record.items() if not k.startswith("grad_norm/")}
            record["amp_overflow"] = 1.0
            record["nonfinite"] = 0.0
            self.sink.emit_scalars(info.step, info.wall, record)
            return
        bad = loss_bad or grads_bad
        record["nonfinite"] = 1.0 if bad else 0.0
        self.sink.emit_scalars(info.step, info.wall, record)
        if not bad:
            self._streak = 0
            return
        self._streak += 1
        if self._streak == 1:
            self._provenance(info, loss_value, total if info.grad_index else None, norms)

    def _depth_ratio(self, index: list[int], norms: list[float]) -> float | None:
        """First over last weight matrix's gradient norm (registration order): far from 1 by
        orders of magnitude when gradients vanish or explode across depth."""
        matrices = [v for i, v in zip(index, norms, strict=True) if self.is_matrix[i]]
        if len(matrices) < 2:
            return None
        first, last = matrices[0], matrices[-1]
        if not (math.isfinite(first) and math.isfinite(last)) or last <= 0:
            return None
        return first / last

    def _emit_sample(self, step: int, wall: float, layout: dict[str, Any], host: list[torch.Tensor]) -> None:
        record: dict[str, float] = {}
        if "weight_norms" in layout:
            for name, v in zip(self.names, host[layout["weight_norms"]].tolist(), strict=True):
                record[f"weight_norm/{name}"] = v
        if "acts" in layout:
            at, names = layout["acts"]
            for name, row in zip(names, host[at].tolist(), strict=True):
                for stat, v in zip(STATS, row, strict=True):
                    if stat != "input_zero_frac" or not math.isnan(v):  # NaN there: not a layer input
                        record[f"act/{name}/{stat}"] = v
        if "attn" in layout:
            at, names = layout["attn"]
            record.update({logit_key(name): v for name, v in zip(names, host[at].tolist(), strict=True)})
        if record:
            self.sink.emit_scalars(step, wall, record)
        if "hists" in layout:
            at, keys = layout["hists"]
            for key, counts, (lo, width) in zip(keys, host[at].tolist(), host[at + 1].tolist(), strict=True):
                self.sink.emit_histogram(key, step, wall, counts, lo, width)

    # ------------------------------------------------------------------ NaN provenance
    def _provenance(self, info: StepInfo, loss: float | None, total: float | None, norms: Sequence[float]) -> None:
        data = nonfinite_report(
            self.model,
            self.names,
            self.params,
            self._forward_rank,
            replay=self._replay_ok,
            inputs=info.inputs,
            live=info.step == self._current,  # read back within its own run.step (always so on the CPU)
            loss=loss,
            total=total,
            grad_index=info.grad_index,
            norms=norms,
        )
        self.sink.emit_event(EVENT_NONFINITE, info.step, data, level="error")
        logger.warning(
            "trimtab: non-finite values at step %d (source: %s; first module: %s; first parameter gradient: %s)",
            info.step,
            data["source"],
            data["module"],
            data["param"],
        )

    # ------------------------------------------------------------------ governor
    def _report_overhead(self, step: int) -> None:
        overall, plain = self.meter.take()
        if overall is None:
            return
        self.sink.emit_scalars(
            step, time.time(), {"agent/overhead_pct": overall, "agent/sample_every": self.sample_every}
        )
        change = self.governor.decide(overall, plain, self.meter.reports, self.per_param, self.sample_every)
        if change is None:
            return
        self.per_param, self.sample_every = change.per_param, change.sample_every
        self.meter.report_every = self.sample_every
        self.sink.emit_event(EVENT_OVERHEAD_GOVERNOR, step, change.event(overall, plain), level="warning")
        logger.warning(
            "trimtab: the agent costs %.2f%% of the step time, over its %.2f%% budget: %s",
            overall,
            change.budget_pct,
            change.action,
        )

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Hand over every copy still in flight and remove every hook."""
        try:
            self.transfers.poll(wait=True)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            for probe in self._probes:
                probe.collect()


def _real(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Complex tensors as real views (same norm): the float32 norm dtype needs real inputs."""
    if not any(t.is_complex() for t in tensors):
        return tensors
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _foreach_norms(tensors: list[torch.Tensor], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The L2 norm of each tensor, in one fused call per precision: half-precision ones summed
    in float32 (``kwargs``), float64 ones (a model trained in double) in float64, which
    ``dtype=float32`` would refuse as a narrowing."""
    real = _real(tensors)
    wide = [i for i, t in enumerate(real) if t.dtype == torch.float64]
    if not wide or not kwargs:
        return list(torch._foreach_norm(real, 2, **kwargs))
    if len(wide) == len(real):
        return list(torch._foreach_norm(real, 2))
    narrow = [i for i in range(len(real)) if real[i].dtype != torch.float64]
    out: list[torch.Tensor] = [real[0]] * len(real)
    for indices, extra in ((wide, {}), (narrow, kwargs)):
        for i, norm in zip(indices, torch._foreach_norm([real[i] for i in indices], 2, **extra), strict=True):
            out[i] = norm
    return out


def _foreach_norm_kwargs() -> dict[str, Any]:
    """``dtype=float32`` where this torch has it: fp16/bf16 norms then cannot overflow."""
    try:
        torch._foreach_norm([torch.ones(1, dtype=torch.float16)], 2, dtype=torch.float32)
        return {"dtype": torch.float32}
    except (TypeError, RuntimeError):
        return {}
