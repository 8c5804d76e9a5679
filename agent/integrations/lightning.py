"""PyTorch Lightning: ``trainer = L.Trainer(callbacks=[TrimtabCallback(project="gpt")])``.

The callback watches the LightningModule and its first optimizer when fit starts and calls
``run.step`` in ``on_before_optimizer_step``: after backward (and after AMP unscaling),
before gradient clipping, so ``grad_norm/total`` is the norm before clipping. The loss is
the sum over the micro-batches of an accumulation window of the loss Lightning back-
propagates (already divided by ``accumulate_grad_batches``), i.e. their mean. Each rank
streams; by default only rank 0 sends histograms. NaN provenance replays the module's
forward on the captured inputs when ``training_step`` calls ``self(...)``.

Works with ``lightning`` (``import lightning.pytorch``) and, failing that, ``pytorch_lightning``.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef,assignment]

import torch

from trimtab.integrations._common import RunHolder
from trimtab.run import Run


class TrimtabCallback(Callback):  # type: ignore[misc]
    """Stream a Lightning fit to trimtab.

    Args:
        run: a run from ``trimtab.init``; when None, the callback starts one on each rank when
            fit begins (with ``**init``, e.g. ``project=``, ``name=``, ``server=``) and
            finishes it when fit ends.
        watch: keyword arguments for ``run.watch`` (``sample_every``, ``batch_size``, ...).
    """

    def __init__(self, run: Run | None = None, *, watch: dict[str, Any] | None = None, **init: Any) -> None:
        self._holder = RunHolder(run, watch, init)

    @property
    def run(self) -> Run | None:
        return self._holder.run

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        run = self._holder.ensure_run(trainer.global_rank, trainer.world_size)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        scheduler = configs[0].scheduler if configs else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        run.watch(pl_module, optimizer, scheduler, scaler, **self._holder.watch_options)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Any) -> None:
        self._holder.add_loss(loss)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._holder.run is None:
            return
        loss = self._holder.take_loss()
        scaler: Any = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        if loss is not None and isinstance(scale, torch.Tensor) and scaler.is_enabled():
            # "16-mixed" scales the loss before on_before_backward sees it; the scale is the
            # same for the whole window. A device tensor: no synchronisation.
            loss = loss / scale.to(loss.device)
        self._holder.run.step(loss, step=trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        run = self._holder.run
        if run is not None and run.should_stop():  # a `stop` command: Lightning ends the fit cleanly
            trainer.should_stop = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._holder.end()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._holder.end()
