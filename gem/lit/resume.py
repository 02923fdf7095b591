"""The resume checkpoint: `<run dir>/lightning/last.ckpt`, kept current during training.

Lightning's ModelCheckpoint with `save_top_k=0` writes `last.ckpt` only alongside a top-k file,
so at epoch ends it writes nothing; this callback writes it at every epoch end and every
`every_n_train_steps` optimizer steps. Each write goes to a temporary file that then replaces
the old one, so a run killed while writing still has its previous checkpoint whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L


class ResumeCheckpoint(L.Callback):
    def __init__(self, path: str | os.PathLike, every_n_train_steps: int | None = None):
        if every_n_train_steps is not None and int(every_n_train_steps) < 1:
            raise ValueError(f"resume_checkpoints.every_n_train_steps={every_n_train_steps}: use a positive "
                             f"number of optimizer steps, or null for epoch ends only")
        self.path = Path(path)
        self.every_n_train_steps = int(every_n_train_steps) if every_n_train_steps else None
        self._saved_at_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._saved_at_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Every rank calls this (the checkpoint is gathered collectively); rank 0 writes it."""
        partial = self.path.with_name(self.path.name + ".partial")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(partial, weights_only=False)  # the full state (saying so quiets an INFO line)
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        self._saved_at_step = trainer.global_step
