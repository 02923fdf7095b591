"""One log line per epoch: the dev metrics, the mean training loss, the time, and an estimate of
the time left for the run's remaining epochs (Lightning's progress bar is for terminals; a
console captured to a file, or a job's log, shows these lines instead):

    epoch 1/4: dev/acc 0.8420 (best 0.8420, epoch 1) | train/loss 0.3310 | 41s | elapsed 1m 30s, about 2m 03s left, then the test

Epochs are numbered from 0, as in Lightning's progress bar and the record's `best_epoch`. Rank 0 only. The estimate is the mean time of the epochs this process trained so far (a resumed
run starts a new mean), times the epochs left.
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch

from gem.progress import format_duration

log = logging.getLogger("gem.epochs")


class EpochSummary(L.Callback):
    def __init__(self, logger: logging.Logger | None = None):
        self._logger = logger or log
        self._fit_started: float | None = None
        self._epoch_started: float | None = None
        self._epoch_times: list[float] = []
        self._loss_sum = 0.0
        self._loss_count = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.perf_counter()
        self._loss_sum, self._loss_count = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = float(loss.detach())
            if math.isfinite(value):
                self._loss_sum += value
                self._loss_count += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook: the dev metrics are in `history`.
        now = time.perf_counter()
        took = now - (self._epoch_started or now)
        self._epoch_times.append(took)
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._logger.info(self.line(trainer, pl_module, took, now))

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, took: float, now: float) -> str:
        epoch = trainer.current_epoch
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        # numbered from 0 as in Lightning's progress bar and the record's best_epoch
        head = f"epoch {epoch}/{max_epochs - 1}" if max_epochs else f"epoch {epoch}"
        parts = [head + ": " + self._dev_text(pl_module, epoch)]
        if self._loss_count:
            parts.append(f"train/loss {self._loss_sum / self._loss_count:.4f}")
        parts.append(format_duration(took))
        timing = f"elapsed {format_duration(now - (self._fit_started or now))}"
        left_epochs = (max_epochs - epoch - 1) if max_epochs else None
        if trainer.max_steps and trainer.max_steps > 0:
            left_epochs = None  # the run ends on a step count; the epoch count does not say when
        if left_epochs:
            mean = sum(self._epoch_times) / len(self._epoch_times)
            timing += f", about {format_duration(mean * left_epochs)} left, then the test"
        elif left_epochs == 0:
            timing += ", training done; the test follows"
        parts.append(timing)
        return " | ".join(parts)

    @staticmethod
    def _dev_text(pl_module: L.LightningModule, epoch: int) -> str:
        history = getattr(pl_module, "history", None) or []
        if not history or history[-1].get("epoch") != epoch:
            return "no dev score this epoch"
        values = {k: v for k, v in history[-1].items() if k.startswith("dev/") and k != "dev/loss"}
        main = getattr(pl_module, "main_metric", None)
        key = f"dev/{main}" if main and f"dev/{main}" in values else next(iter(values), None)
        if key is None:
            return "no dev score this epoch"
        text = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        best_epoch = getattr(pl_module, "best_epoch", None)
        best = (getattr(pl_module, "best_dev", None) or {}).get(key)
        if best is not None and best_epoch is not None:
            text += f" (best {best:.4f}, epoch {best_epoch})"
        return text
