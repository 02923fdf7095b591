"""The Lightning glue of GEM: the library's selection before the first step, the check after the last.

Runs in `setup("fit")`, which Lightning calls after the process group exists (DDP) and
before `configure_optimizers`, so the optimizer is built over the selected deltas only: the
method selects (`gem.select_entries` on the training data's first examples, with the
module's own training loss) and the Lightning module's model becomes the PEFT-wrapped one.
A resumed fit takes its entries from the checkpoint instead. At the end it counts the
entries of the target matrices that changed outside the selection (must be 0) and inside
it, and checks that every other tensor (checksums taken before training) is unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)
FP16_LOSS_SCALE = 2.0**12


class SparseSelection(L.Callback):
    def __init__(self, method, datamodule, *, record=None, run_dir: str | Path | None = None, seed: int = 0,
                 resume_from: str | Path | None = None):
        self.method = method
        # The checkpoint this fit resumes from. Passed in because Lightning sets
        # `trainer.ckpt_path` only after the setup hooks, where the entries must already exist.
        self.resume_from = resume_from
        self.datamodule = datamodule
        self.record = record
        self.run_dir = Path(run_dir) if run_dir else None
        self.seed = seed
        self.targets: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}  # module -> (weight, W0 on CPU)
        self.checksums: list[tuple[str, torch.Tensor, str]] = []  # every other tensor: (name, tensor, sha256)
        self.summary: dict = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.method.selected:
            return
        model = pl_module.model
        model.to(trainer.strategy.root_device)
        if self.method.config.verify_untouched:
            self._take_reference(model)
        if self.resume_from:
            # Resuming: the entries are part of the checkpoint; no new gradient pass (which could
            # differ on non-deterministic hardware). Lightning then restores deltas and optimizer.
            masks = masks_from_checkpoint(self.resume_from)
            device = trainer.strategy.root_device
            pl_module.model = self.method.restore(model, {n: idx.to(device) for n, idx in masks.items()})
            log.info("%s: %d masks restored from %s", self.method.name, len(masks), self.resume_from)
            return
        batches = None
        if self.method.needs_gradients:
            batches = self.datamodule.gradient_pass_dataloader(int(self.method.config.num_grad_samples),
                                                               trainer.global_rank, trainer.world_size)
        # The same loss as training (the decoder path scores candidates, not model(**batch).loss), or the
        # authors' plain LM loss over prompt + gold answer (method.gradient_pass_loss=lm, decoders).
        loss_fn = pl_module.batch_loss
        if self.method.config.gradient_pass_loss == "lm":
            from gem.lit.causal_module import prompt_and_answer_loss

            loss_fn = prompt_and_answer_loss
        # Under the trainer's precision: Lightning calls setup outside its autocast context. In fp16
        # a power-of-two loss scale keeps small gradients from underflowing (divided out exactly).
        precision = str(trainer.precision)
        scale = FP16_LOSS_SCALE if precision.startswith("16") else 1.0
        if not precision.startswith(("32", "64")):
            loss_fn = _under_precision(trainer.precision_plugin, loss_fn, scale)
        pl_module.model = self.method.select(model, batches, loss_fn, seed=self.seed, loss_scale=scale)
        selection = self.method.selection
        asked = int(self.method.config.num_grad_samples)
        if self.method.needs_gradients and selection.gradient_samples < asked:
            log.warning("%s: method.num_grad_samples=%d but the training set holds %d examples; the gradient pass "
                        "used all of them", self.method.name, asked, selection.gradient_samples)
        self.summary = {
            "budget": selection.total_budget, "tuned": selection.tuned, "gradient_samples": selection.gradient_samples,
            "budgets": selection.budgets, "gradient_pass_s": round(selection.gradient_pass_s, 3),
            "selection_math_s": round(selection.selection_math_s, 3),
            "delta_init": self.method.config.delta_init, "threshold": self.method.config.threshold,
            "ranks_with_identical_masks": selection.ranks_with_identical_masks,
        }
        self._save_allocation(trainer, selection.allocation)
        self._update_record()

    def _take_reference(self, model: torch.nn.Module) -> None:
        """W0 of the target matrices (for exact counts) and a checksum of every other non-head tensor."""
        targets = self.method.target_weights(model)
        target_ids = {id(w) for w in targets.values()}
        self.targets = {name: (w, w.detach().to("cpu", copy=True)) for name, w in targets.items()}
        self.checksums = [(name, p, _checksum(p)) for name, p in model.named_parameters()
                          if id(p) not in target_ids and not self.method._is_head(name)]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.targets:
            return
        from gem.tuner import gem_modules

        layers = {id(layer.base_layer.weight): layer for _, layer in gem_modules(pl_module.model)}
        for layer in layers.values():
            layer.materialize()
        outside = inside = 0
        for name, (weight, before) in self.targets.items():
            changed = weight.detach().cpu().ne(before).view(-1)
            in_mask = torch.zeros_like(changed)
            layer = layers.get(id(weight))
            if layer is not None:
                in_mask[layer.gem_indices["default"].cpu()] = True
            inside += int((changed & in_mask).sum())
            outside += int((changed & ~in_mask).sum())
        moved = [name for name, tensor, digest in self.checksums if _checksum(tensor) != digest]
        self.summary.update(changed_outside_mask=outside, changed_inside_mask=inside)
        self._update_record()
        if outside or moved:
            raise RuntimeError(f"the sparse training is broken: {outside} entries of the target matrices changed "
                               f"outside the selection, and {len(moved)} other tensors changed"
                               + (f" (first: {moved[0]})" if moved else ""))

    def state_dict(self) -> dict:
        return {"summary": self.summary}

    def load_state_dict(self, state_dict: dict) -> None:
        self.summary = dict(state_dict.get("summary", {}))
        self._update_record()

    def _update_record(self) -> None:
        if self.record is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            self.record.update(gem=self.summary)

    def _save_allocation(self, trainer: L.Trainer, rows: list[dict]) -> None:
        if self.run_dir is None or trainer.global_rank != 0 or not rows:
            return
        csv_path = self.run_dir / "allocation.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        png_path = plot_allocation(rows, self.run_dir / "allocation.png", title=self.method.name)
        logger = trainer.logger
        if logger is not None and type(logger).__name__ == "WandbLogger":
            logger.log_image("gem/allocation", [str(png_path)])
            logger.log_table("gem/allocation_table", columns=list(rows[0]),
                             data=[[r[c] for c in rows[0]] for r in rows])


def _under_precision(plugin, loss_fn, scale: float):
    def loss(model, batch):
        with plugin.forward_context():
            return loss_fn(model, batch) * scale

    return loss


def _checksum(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def masks_from_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The selected flat indices per matrix (base-model module names), from a Lightning checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    prefix, suffix = "model.base_model.model.", ".gem_indices.default"
    masks = {key[len(prefix):-len(suffix)]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith(prefix) and key.endswith(suffix)}
    if not masks:
        raise ValueError(f"checkpoint {path} holds no GEM entries (no '*{suffix}' tensors): was it saved by a "
                         f"run of another method, or before GEM became a PEFT tuner? Resume with the method and "
                         f"version that made it")
    return masks


def plot_allocation(rows: list[dict], path: Path, title: str = "") -> Path:
    """Per eligible matrix: its budget, and (where defined) ||r|| and H, as three bar rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"].replace(".attention.self", "").replace("encoder.layer.", "L").replace("model.layers.", "L")
             for r in rows]
    panels = [k for k in ("budget", "r_norm", "entropy") if k in rows[0]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.35 * len(rows)), 2.2 * len(panels)), sharex=True)
    axes = [axes] if len(panels) == 1 else axes
    for ax, key in zip(axes, panels):
        ax.bar(range(len(rows)), [float(r[key]) for r in rows], color="tab:blue")
        ax.set_ylabel(key)
    axes[-1].set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
    axes[0].set_title(f"{title}: per-matrix allocation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
