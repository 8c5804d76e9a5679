"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[TrimtabCallback(project="gpt")])``.

The callback watches the model and the optimizer when training begins and calls
``run.step`` in ``on_pre_optimizer_step``. The loss is read from the model's outputs (the
``loss`` field a model computes when given ``labels``), averaged over the micro-batches of a
gradient-accumulation window, on the device.

One difference from a plain loop: the Trainer clips gradients (``max_grad_norm``, 1.0 by
default) *before* any callback runs, so ``grad_norm/total`` and ``grad_norm/<param>`` are
the norms after clipping. The Trainer's own pre-clip norm is forwarded from its logs as
``hf/grad_norm`` at every logging step; set ``max_grad_norm=0`` to see unclipped gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trimtab.integrations._common import RunHolder
from trimtab.run import Run


class TrimtabCallback(TrainerCallback):  # type: ignore[misc]
    """Stream a ``transformers.Trainer`` run to trimtab.

    Args:
        run: a run from ``trimtab.init``; when None, the callback starts one on each process
            when training begins (with ``**init``, e.g. ``project=``, ``name=``) and finishes
            it when training ends.
        watch: keyword arguments for ``run.watch`` (``sample_every``, ``batch_size``, ...).
    """

    def __init__(self, run: Run | None = None, *, watch: dict[str, Any] | None = None, **init: Any) -> None:
        self._holder = RunHolder(run, watch, init)
        self._hook: Any = None
        self._window_normalised = False

    @property
    def run(self) -> Run | None:
        return self._holder.run

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        run = self._holder.ensure_run(args.process_index, args.world_size)
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        inner = getattr(optimizer, "optimizer", None)  # accelerate wraps the optimizer
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        if model is None:
            return
        # accelerate keeps fp16's GradScaler on its optimizer wrapper: given to watch, an
        # overflow skip is known as one (not a NaN for the autopilot to act on).
        scaler = getattr(optimizer, "scaler", None)
        run.watch(model, optimizer, kwargs.get("lr_scheduler"), scaler, **self._holder.watch_options)
        if self._hook is None:
            self._hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)

    def _capture_loss(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if module.training and torch.is_grad_enabled() and isinstance(output, Mapping):
            # Given num_items_in_batch, the model divides by the whole window's token count:
            # its micro-batch losses already sum to the window's mean.
            self._window_normalised = kwargs.get("num_items_in_batch") is not None
            self._holder.add_loss(output.get("loss"))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        loss = self._holder.take_loss()
        if loss is not None and self._window_normalised:
            # The model divided by the tokens of every process's window (average_tokens_across_devices);
            # the Trainer multiplies by the process count afterwards, and so do we.
            if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
                loss = loss * args.world_size
        elif loss is not None and args.gradient_accumulation_steps > 1:
            loss = loss / args.gradient_accumulation_steps
        if self._holder.run is not None:
            self._holder.run.step(loss, step=state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        run = self._holder.run
        if run is not None and run.should_stop():  # a `stop` command: the Trainer ends cleanly
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        run = self._holder.run
        value = (logs or {}).get("grad_norm")
        if run is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            run.log({"hf/grad_norm": float(value)}, step=state.global_step - 1)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._holder.end()
