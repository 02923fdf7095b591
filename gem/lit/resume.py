"""The resume checkpoint: `<run dir>/lightning/last.ckpt`, kept current during training.

Lightning's ModelCheckpoint with `save_top_k=0` writes `last.ckpt` only alongside a top-k file,
so at epoch ends it writes nothing; this callback writes it at every epoch end and every
`every_n_train_steps` optimizer steps. Each write goes to a temporary file that then replaces
the old one, so a run killed while writing still has its previous checkpoint whole.

A checkpoint proves what it is: it carries the run's identity (the settings a resume must
repeat, `IDENTITY_KEY`), and a sidecar `last.ckpt.sha256` holds the checksum of its bytes,
written once the file is complete. `verify_checkpoint` checks both before a resume loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L

IDENTITY_KEY = "gem_run_identity"  # in the checkpoint dict: the run's settings, as JSON text
CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A resume checkpoint that must not be loaded: the message says why and what to do."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResumeCheckpoint(L.Callback):
    def __init__(self, path: str | os.PathLike, every_n_train_steps: int | None = None, identity: dict | None = None):
        if every_n_train_steps is not None and int(every_n_train_steps) < 1:
            raise ValueError(f"resume_checkpoints.every_n_train_steps={every_n_train_steps}: use a positive "
                             f"number of optimizer steps, or null for epoch ends only")
        self.path = Path(path)
        self.every_n_train_steps = int(every_n_train_steps) if every_n_train_steps else None
        self.identity = identity
        self._saved_at_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._saved_at_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if self.identity is not None:  # JSON text: loads under weights_only=True, compares as the record does
            checkpoint[IDENTITY_KEY] = json.dumps(self.identity, sort_keys=True, default=str)

    def save(self, trainer: L.Trainer) -> None:
        """Every rank calls this (the checkpoint is gathered collectively); rank 0 writes it.

        Order: checkpoint to `last.ckpt.partial`, its checksum to `last.ckpt.partial.sha256`, then
        both renamed over the old pair. A kill between the two renames leaves the new checkpoint
        with the old sidecar; `verify_checkpoint` then finds the matching `.partial.sha256`."""
        partial = self.path.with_name(self.path.name + ".partial")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(partial, weights_only=False)  # the full state (saying so quiets an INFO line)
        if trainer.is_global_zero:
            _fsync(partial)
            sidecar = Path(str(partial) + CHECKSUM_SUFFIX)
            _write_synced(sidecar, f"{file_sha256(partial)}  {self.path.name}\n")
            os.replace(partial, self.path)
            os.replace(sidecar, Path(str(self.path) + CHECKSUM_SUFFIX))
        self._saved_at_step = trainer.global_step


def _recorded_sums(path: Path) -> list[str]:
    sums = []
    for sidecar in (Path(str(path) + CHECKSUM_SUFFIX), path.with_name(path.name + ".partial" + CHECKSUM_SUFFIX)):
        try:
            sums.append(sidecar.read_text().split()[0])
        except (OSError, IndexError):
            pass
    return sums


def verify_checkpoint(path: str | os.PathLike, requested: str, unverified_ok: bool = False) -> dict | None:
    """Check a resume checkpoint's bytes against its sidecar checksum and return the identity it
    carries (None when it carries none and `unverified_ok`). Refuses, naming the remedy: a
    checksum that does not match (the file changed after it was written: a bad disk or copy), and
    a checkpoint without a checksum or identity (written before checkpoints carried them, or not
    by a run) unless `unverified_ok` (`resume_unverified=true`)."""
    import torch

    path = Path(path)
    how = (f"to resume it anyway, at your own risk, rerun with resume_unverified=true (the checkpoint is still "
           f"loaded weights-only)")
    sums = _recorded_sums(path)
    if not sums:
        if not unverified_ok:
            raise CheckpointError(f"ckpt_path={requested}: {path} has no checksum file ({path.name}{CHECKSUM_SUFFIX}): "
                                  f"it was written before checkpoints carried one, or not by a run; {how}")
    elif file_sha256(path) not in sums:
        raise CheckpointError(f"ckpt_path={requested}: {path} does not match its checksum ({path.name}{CHECKSUM_SUFFIX}): "
                              f"the file changed after it was written (a disk error, an interrupted copy, an edit). "
                              f"Resume from an intact copy or start the run again")
    try:
        # mmap: the tensors stay on disk; only the small identity entry is read
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(f"ckpt_path={requested}: {path} cannot be read as a weights-only training checkpoint "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    text = checkpoint.get(IDENTITY_KEY) if isinstance(checkpoint, dict) else None
    if text is None:
        if unverified_ok:
            return None
        raise CheckpointError(f"ckpt_path={requested}: {path} carries no run identity (task, model, method, seed), so "
                              f"nothing shows it belongs to this run: it was written before checkpoints carried one; "
                              f"{how}")
    return json.loads(text)
