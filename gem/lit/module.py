"""The LightningModule: trains whatever the method left trainable, evaluates on dev each
epoch, keeps the best dev epoch's trained state, and tests that state (the paper's protocol).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from gem.methods.base import Method
from gem.metrics import build_metrics


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier on the base LR per optimizer step: linear warmup, then constant or linear decay."""
    if schedule not in ("constant", "linear"):
        raise ValueError(f"optim.scheduler={schedule!r} is unknown; use constant or linear")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        remaining = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / remaining)

    return factor


class BestEpochModule(L.LightningModule):
    """What every path shares: the training step over `batch_loss`, best-dev-epoch bookkeeping
    (history, best_epoch, best_dev, best_state via `method.state_to_save`), `restore_best`, and
    the AdamW optimizer + LR schedule. Subclasses define `batch_loss` and the evaluation steps,
    and call `_dev_epoch_done` / `_test_epoch_done` with their metric values."""

    def __init__(self, model: torch.nn.Module, method: Method, *, main_metric: str, optim: dict[str, Any]):
        super().__init__()
        # Hugging Face models load in eval mode; Lightning keeps each module's mode, so
        # switch to train mode here or dropout would stay off for the whole run.
        self.model = model.train()
        self.method = method
        self.main_metric = main_metric
        self.optim = dict(optim)
        self.history: list[dict[str, float]] = []   # dev metrics per epoch
        self.best_epoch: int | None = None
        self.best_dev: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.test_results: dict[str, float] = {}

    def batch_loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        """The training loss of `model` on `batch` (GEM's gradient pass uses it too)."""
        raise NotImplementedError

    @staticmethod
    def batch_size_of(batch) -> int:
        return len(batch["labels"]) if "labels" in batch else len(batch["input_ids"])

    def training_step(self, batch, batch_idx):
        loss = self.batch_loss(self.model, batch)
        if not torch.isfinite(loss):
            precision = str(getattr(self.trainer, "precision", "32-true"))
            fix = "" if precision.startswith("32") else f" or use trainer.precision=32-true (now {precision})"
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                f"lower optim.lr (now {self.optim['lr']}){fix}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=self.batch_size_of(batch))
        return loss

    # --- epoch ends: best-epoch bookkeeping ---------------------------------------------
    def _dev_epoch_done(self, values: dict[str, float]) -> None:
        """Record one epoch's dev metrics ("dev/<name>"); keep the trained state if it is the best."""
        if self.trainer.sanity_checking:
            return
        self.log_dict(values, prog_bar=True)
        epoch = self.current_epoch
        self.history.append({"epoch": epoch, **values})
        score = values[f"dev/{self.main_metric}"]
        best = self.best_dev.get(f"dev/{self.main_metric}", -math.inf)
        # NaN (e.g. a correlation of a constant prediction) never counts as best, and a NaN
        # kept only because it came first gives way to the first real score.
        if self.best_epoch is None or (not math.isnan(score) and (score > best or math.isnan(best))):
            self.best_epoch, self.best_dev = epoch, values
            self.best_state = {k: v.clone() for k, v in self.method.state_to_save(self.model).items()}
        self.log("dev/best_" + self.main_metric, self.best_dev[f"dev/{self.main_metric}"])

    def _test_epoch_done(self, values: dict[str, float]) -> None:
        self.test_results = values
        self.log_dict(self.test_results)

    # --- resuming: the best-epoch bookkeeping travels in Lightning's checkpoint ---------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["best_epoch_tracking"] = {"history": self.history, "best_epoch": self.best_epoch,
                                             "best_dev": self.best_dev, "best_state": self.best_state}
        # Dropout draws from the global generator: without its state a resumed run diverges.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("best_epoch_tracking", {})
        self.history = list(state.get("history", []))
        self.best_epoch = state.get("best_epoch")
        self.best_dev = dict(state.get("best_dev", {}))
        self.best_state = state.get("best_state")
        rng = checkpoint.get("rng_states")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def restore_best(self) -> None:
        """Load the best dev epoch's trained state back into the model before testing."""
        if self.best_state is not None:
            self.method.load_saved(self.model, self.best_state)

    # --- optimisation ------------------------------------------------------------------
    def total_training_steps(self) -> int:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        examples = len(trainer.datamodule.task.train)
        batches = math.ceil(examples / (trainer.datamodule.batch_size * max(1, trainer.world_size)))
        if trainer.limit_train_batches is not None and isinstance(trainer.limit_train_batches, int):
            batches = min(batches, trainer.limit_train_batches)
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches) * int(trainer.max_epochs))

    def configure_optimizers(self):
        groups = self.method.optimizer_param_groups(self.model, self.optim["weight_decay"])
        if not groups:
            raise RuntimeError(f"method {self.method.name} left no trainable parameter; nothing to optimise")
        # On a GPU the fused kernel (GEM: host cost per module matters there); on the CPU the default
        # path, so CPU runs keep their bit-exact results. GEM's class updates all its deltas as one vector.
        fused = True if self.device.type == "cuda" else None
        optimizer = self.method.optimizer_class(groups, lr=self.optim["lr"], betas=tuple(self.optim["betas"]),
                                                eps=self.optim["eps"], fused=fused)
        # Not trainer.estimated_stepping_batches: it builds the train loader before a checkpoint is
        # restored, and Lightning then never hands the loader its saved position (mid-epoch resume).
        total = self.total_training_steps()
        warmup = int(self.optim.get("warmup_ratio", 0.0) * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.optim.get("scheduler", "constant"), warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FineTuneModule(BestEpochModule):
    """Head path: sequence classification, regression and multiple choice with a task head."""

    def __init__(self, model: torch.nn.Module, method: Method, *, task_kind: str, metric_names: list[str],
                 num_labels: int, optim: dict[str, Any]):
        super().__init__(model, method, main_metric=metric_names[0], optim=optim)
        self.task_kind = task_kind
        metrics = build_metrics(metric_names, task_kind, num_labels)
        self.dev_metrics = metrics.clone(prefix="dev/")
        self.test_metrics = metrics.clone(prefix="test/")

    # --- steps ---------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(**batch)

    def batch_loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        return model(**batch).loss

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        if self.task_kind == "regression":
            return logits.squeeze(-1).float()
        return logits.argmax(dim=-1)

    def _evaluate(self, batch, metrics, loss_name: str):
        out = self(batch)
        metrics.update(self._predictions(out.logits), batch["labels"])
        self.log(loss_name, out.loss, on_epoch=True, batch_size=len(batch["labels"]))

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.dev_metrics, "dev/loss")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_metrics, "test/loss")

    def on_validation_epoch_end(self):
        values = {k: float(v) for k, v in self.dev_metrics.compute().items()}
        self.dev_metrics.reset()
        self._dev_epoch_done(values)

    def on_test_epoch_end(self):
        values = {k: float(v) for k, v in self.test_metrics.compute().items()}
        self.test_metrics.reset()
        self._test_epoch_done(values)
