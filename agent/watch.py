"""``run.watch(model, optimizer)`` and ``run.step(loss)``: what the agent measures each step.

Every step (no host-device synchronisation): the loss, the total gradient norm before
clipping, one gradient norm per parameter (one ``torch._foreach_norm`` call), the learning
rate of each param group, the loss scale, the step time and throughput, and a 0/1
``nonfinite`` flag. The numbers are packed into one device tensor and copied to the host
asynchronously (see ``transfer.py``); they are logged when the copy has landed.

Every ``sample_every`` steps (100 by default) also: weight norms, the update ratio
||dW|| / ||W|| per parameter, weight and gradient histograms, and activation statistics
from forward hooks that exist only for that step's forward pass.

A non-finite loss or gradient norm triggers NaN provenance (``provenance.py``) once per
streak of non-finite steps, and an event that is never dropped. The agent times itself and,
past its overhead budget, samples less often (``overhead.py``); it says so in an event.

Key names are documented in ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from trimtab.activations import STATS, ActivationProbe, default_modules
from trimtab.histogram import Summary, histogrammable, summarize
from trimtab.overhead import OverheadMeter
from trimtab.provenance import all_finite, replay_forward, tensor_summary
from trimtab.transfer import Transfers

if TYPE_CHECKING:
    from torch.optim import Optimizer

logger = logging.getLogger("trimtab")

MAX_SAMPLE_EVERY = 1 << 20
UPDATE_SAMPLE = 4096  # elements per parameter the update ratio is estimated from
MAX_LISTED_PARAMS = 20


class Sink(Protocol):
    """What the watcher needs from a Run."""

    rank: int

    def emit_scalars(self, step: int, wall: float, record: dict[str, float]) -> None: ...
    def emit_histogram(self, key: str, step: int, wall: float, summary: list[int], lo: float, width: float) -> None: ...
    def emit_event(self, kind: str, step: int | None, data: dict[str, Any], level: str = "info") -> None: ...
    def warn_once(self, topic: str, message: str) -> None: ...


@dataclass
class WatchOptions:
    """Cadence and switches of ``run.watch``; every one is a keyword argument of it."""

    sample_every: int = 100  # weight norms, update ratios, histograms, activations
    histograms: bool = True
    activations: bool = True
    update_ratio: bool = True
    param_grad_norms: bool = True  # one grad_norm/<param> per parameter, every step
    bins: int = 64
    overhead_budget: float | None = 0.02  # fraction of step time; past it, sample less often (None: never)
    batch_size: int | None = None  # samples per optimizer step, for throughput
    tokens_per_step: int | None = None  # tokens per optimizer step, for throughput
    all_ranks_histograms: bool = False  # by default only rank 0 sends histograms
    activation_modules: Callable[[str, nn.Module], bool] | None = None  # default: leaf modules
    replay_on_nonfinite: bool = True

    def check(self) -> None:
        for name in ("sample_every", "bins"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"run.watch: {name} must be a positive int, got {value!r}")
        if self.bins > 4096:
            raise ValueError(f"run.watch: bins must be at most 4096, got {self.bins}")
        budget = self.overhead_budget
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1
        ):
            raise ValueError(f"run.watch: overhead_budget is a fraction in (0, 1] or None, got {budget!r}")
        for name in ("batch_size", "tokens_per_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"run.watch: {name} must be a positive int or None, got {value!r}")


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
        self.transfers = Transfers()
        self._replay_ok = opts.replay_on_nonfinite and _plain_module(model)
        self.meter = OverheadMeter(report_every=opts.sample_every)
        self._over_budget_said = False
        self._nan: dict[torch.device, torch.Tensor] = {}  # the "absent" entries of the step tensor
        self._norm_kwargs = _foreach_norm_kwargs()
        self._forward_rank: dict[str, int] = {}
        self._last_start: float | None = None
        self._last_sampled = False
        self._last_step: int | None = None
        self._streak = 0
        self._inputs: list[Inputs] = []  # every grad-enabled forward since the last step
        self._ratio: tuple[int, float, list[int], list[torch.Tensor | None], list[torch.Tensor]] | None = None
        self._ratio_index: dict[int, torch.Tensor] = {}
        self._current: int | None = None  # the step run.step is handling, while it runs
        self._handles = [model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)]
        if optimizer is not None and opts.update_ratio and self.params:
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if self.probe is not None and next_step % self.sample_every == 0:
            self.probe.arm()

    # ------------------------------------------------------------------ hooks
    def _capture_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and len(self._inputs) < MAX_KEPT_INPUTS:
            self._inputs.append((args, kwargs))  # references only: kept for NaN provenance

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._ratio is None:
            return
        start = time.perf_counter()
        try:
            step, wall, index, picks, before = self._ratio
            self._ratio = None
            with torch.no_grad():
                deltas, norms = [], []
                for i, pick, old in zip(index, picks, before, strict=True):
                    new = _pick(self.params[i], pick).float()
                    deltas.append(torch.linalg.vector_norm(new - old))
                    norms.append(torch.linalg.vector_norm(old))
                device = deltas[0].device
                packed = torch.stack(
                    [torch.stack([d.to(device) for d in deltas]), torch.stack([n.to(device) for n in norms])]
                )
            self.transfers.submit([packed], lambda host: self._emit_ratios(step, wall, index, host[0]))
        except Exception as exc:
            self._ratio = None
            self.sink.warn_once("ratio", f"update ratios are off: {exc!r}")
            self.opts.update_ratio = False
        finally:
            self.meter.add(time.perf_counter() - start)

    # ------------------------------------------------------------------ the step
    def step(self, loss: Any, step: int, batch_size: int | None, tokens: int | None) -> None:
        start = time.perf_counter()
        self._current = step
        try:
            self._step(start, loss, step, batch_size, tokens)
        finally:
            self._current = None
            if self.probe is not None and (step + 1) % self.sample_every == 0:
                self.probe.arm()
            self._last_start = start
            self.meter.add(time.perf_counter() - start)

    def _step(self, start: float, loss: Any, step: int, batch_size: int | None, tokens: int | None) -> None:
        wall_since = None if self._last_start is None else start - self._last_start
        self.meter.close_step(wall_since, self._last_sampled)
        self.transfers.poll()
        if self._ratio is not None:  # the optimizer did not step after the sampled step (AMP skip)
            self._ratio = None
        sampled = step % self.sample_every == 0
        self._last_sampled = sampled
        wall = time.time()
        host: dict[str, float] = {}
        if self.optimizer is not None:
            for i, group in enumerate(self.optimizer.param_groups):
                lr = group.get("lr")
                if isinstance(lr, (int, float)) or (
                    isinstance(lr, torch.Tensor) and lr.device.type == "cpu" and lr.numel() == 1
                ):
                    host[f"lr/group{i}"] = float(lr)
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
        elif self.probe is not None and self.probe.armed:
            self.probe.collect()  # armed for a step that was not sampled (explicit steps): discard
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
            norms = torch._foreach_norm(_real(grads), 2, **self._norm_kwargs)
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
        self.meter.add(seen.seconds if seen is not None else 0.0)
        if seen is not None and seen.names:
            self._forward_rank = {name: i for i, name in enumerate(seen.names)}
        tensors: list[torch.Tensor] = []
        layout: dict[str, Any] = {}
        with torch.no_grad():
            if self.params:
                norms = torch._foreach_norm(_real([p.detach() for p in self.params]), 2, **self._norm_kwargs)
                dev = norms[0].device
                layout["weight_norms"] = len(tensors)
                tensors.append(torch.stack([n.float().to(dev) for n in norms]))
            if seen is not None and seen.stats:
                layout["acts"] = (len(tensors), seen.names)
                dev = seen.stats[0].device
                tensors.append(torch.stack([s.to(dev) for s in seen.stats]))
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
            if self.opts.update_ratio and self.params and self.optimizer is not None:
                self._capture_before(step, wall)
        if tensors:
            self.transfers.submit(tensors, lambda host: self._emit_sample(step, wall, layout, host))

    def _capture_before(self, step: int, wall: float) -> None:
        index, picks, before = [], [], []
        for i, p in enumerate(self.params):
            if p.is_complex() or not p.is_floating_point() or p.numel() == 0:
                continue
            pick = self._ratio_pick(i, p)
            index.append(i)
            picks.append(pick)
            before.append(_pick(p, pick).float().clone())
        if index:
            self._ratio = (step, wall, index, picks, before)

    def _ratio_pick(self, i: int, p: torch.Tensor) -> torch.Tensor | None:
        if p.numel() <= UPDATE_SAMPLE:
            return None
        pick = self._ratio_index.get(i)
        if pick is None or pick.device != p.device:
            gen = torch.Generator().manual_seed(i)
            pick = torch.randint(p.numel(), (UPDATE_SAMPLE,), generator=gen)
            if p.device.type == "cuda":  # a copy from pageable memory would synchronise (seen on an H200)
                pick = pick.pin_memory()
            pick = pick.to(p.device, non_blocking=True)
            self._ratio_index[i] = pick
        return pick

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
                    record[f"act/{name}/{stat}"] = v
        if record:
            self.sink.emit_scalars(step, wall, record)
        if "hists" in layout:
            at, keys = layout["hists"]
            for key, counts, (lo, width) in zip(keys, host[at].tolist(), host[at + 1].tolist(), strict=True):
                self.sink.emit_histogram(key, step, wall, counts, lo, width)

    def _emit_ratios(self, step: int, wall: float, index: list[int], packed: torch.Tensor) -> None:
        deltas, norms = packed.tolist()
        record = {
            f"update_ratio/{self.names[i]}": d / w
            for i, d, w in zip(index, deltas, norms, strict=True)
            if w > 0 and math.isfinite(w) and math.isfinite(d)
        }
        if record:
            self.sink.emit_scalars(step, wall, record)

    # ------------------------------------------------------------------ NaN provenance
    def _provenance(self, info: StepInfo, loss: float | None, total: float | None, norms: Sequence[float]) -> None:
        # Read back within its own run.step (always so on the CPU): gradients and weights are as they were.
        live = info.step == self._current
        data: dict[str, Any] = {"loss": loss, "grad_norm_total": total}
        bad = [i for i, v in zip(info.grad_index, norms, strict=False) if not math.isfinite(v)]
        bad.sort(key=self._backward_position)
        if bad:
            first = bad[0]
            grad = self.params[first].grad
            summary = tensor_summary(grad) if live and grad is not None else {}
            data["backward"] = {"param": self.names[first], "grad": summary}
            data["nonfinite_params"] = [self.names[i] for i in bad[:MAX_LISTED_PARAMS]]
            data["n_nonfinite_params"] = len(bad)
        forward: dict[str, Any] = {"replayed": False}
        if not live and not all_finite(self.params):
            # On a GPU the values land after the optimizer stepped: it has spread the NaN into
            # the weights, and a replay would blame whichever layer runs first.
            forward["reason"] = "weights are non-finite since the optimizer step"
            data["weights_finite"] = False
        elif not self._replay_ok:
            forward["reason"] = "replay is off for this model (sharded parameters or replay_on_nonfinite=False)"
        elif info.inputs:
            data["batch_finite"] = all_finite(info.inputs)
            try:
                forward = replay_forward(self.model, info.inputs)
                forward["weights_updated_since"] = not live
            except Exception as exc:
                forward = {"replayed": False, "error": repr(exc)[:500]}
        else:
            forward["reason"] = "no inputs kept: the watched module's own forward was not called this step"
        data["forward"] = forward
        module = forward.get("module")
        param = data.get("backward", {}).get("param")
        data["module"], data["param"] = module, param
        if data.get("batch_finite") is False:
            data["source"] = "batch"  # the inputs themselves held NaN/Inf
        elif module is not None or (loss is not None and not math.isfinite(loss)):
            data["source"] = "forward"
        elif bad or (total is not None and not math.isfinite(total)):
            data["source"] = "backward"  # per-parameter norms may be off on this step: the total tells
        else:
            data["source"] = "unknown"
        self.sink.emit_event("nonfinite", info.step, data, level="error")
        logger.warning(
            "trimtab: non-finite values at step %d (source: %s; first module: %s; first parameter gradient: %s)",
            info.step,
            data["source"],
            module,
            param,
        )

    def _backward_position(self, i: int) -> tuple[int, int]:
        """Sort key: gradients are produced in reverse forward order; unknown modules go by
        reverse registration order."""
        name = self.names[i]
        module = name.rsplit(".", 1)[0] if "." in name else "model"
        rank = self._forward_rank.get(module)
        return (0, -rank) if rank is not None else (1, -i)

    # ------------------------------------------------------------------ governor
    def _report_overhead(self, step: int) -> None:
        overall, plain = self.meter.take()
        if overall is None:
            return
        self.sink.emit_scalars(
            step, time.time(), {"agent/overhead_pct": overall, "agent/sample_every": self.sample_every}
        )
        if self.opts.overhead_budget is None:
            return  # governor off: the cadence stays as configured
        budget = 100.0 * self.opts.overhead_budget
        if self.meter.reports < 2 or overall <= budget:
            return  # the first window holds warm-up costs: judge from the second on
        if plain is not None and plain > budget:
            if not self.per_param:
                if self._over_budget_said:
                    return
                self._over_budget_said = True  # sampling less would not help: say so once
                action = "none left: the every-step work alone is over budget"
            else:
                self.per_param = False
                action = "per-parameter gradient norms now only on sampled steps"
        elif self.sample_every < MAX_SAMPLE_EVERY:
            self.sample_every *= 2
            self.meter.report_every = self.sample_every
            action = f"sampling every {self.sample_every} steps"
        else:
            return
        self.sink.emit_event(
            "overhead_governor",
            step,
            {
                "overhead_pct": overall,
                "every_step_overhead_pct": plain,
                "budget_pct": budget,
                "action": action,
                "sample_every": self.sample_every,
                "per_param_grad_norms": self.per_param,
            },
            level="warning",
        )
        logger.warning("trimtab: agent overhead %.2f%% is over the %.2f%% budget: %s", overall, budget, action)

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Hand over every copy still in flight and remove every hook."""
        try:
            self.transfers.poll(wait=True)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            if self.probe is not None:
                self.probe.collect()


def _plain_module(model: nn.Module) -> bool:
    """False for models whose forward runs collectives (FSDP, DTensor parameters): replaying it
    on the ranks that saw a NaN alone would hang the job."""
    sharded = ("FullyShardedDataParallel", "FSDPModule")
    if any(cls.__name__ in sharded for m in model.modules() for cls in type(m).__mro__):
        return False
    return not any(type(p).__name__ == "DTensor" for p in model.parameters())


def _real(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Complex tensors as real views (same norm): the float32 norm dtype needs real inputs."""
    if not any(t.is_complex() for t in tensors):
        return tensors
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _pick(p: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    return flat if pick is None else flat.index_select(0, pick)


def _foreach_norm_kwargs() -> dict[str, Any]:
    """``dtype=float32`` where this torch has it: fp16/bf16 norms then cannot overflow."""
    try:
        torch._foreach_norm([torch.ones(1, dtype=torch.float16)], 2, dtype=torch.float32)
        return {"dtype": torch.float32}
    except (TypeError, RuntimeError):
        return {}
