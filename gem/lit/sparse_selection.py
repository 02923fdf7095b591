"""The Lightning glue of GEM: gradient pass -> scores -> budgets -> masks, before the first step.

Runs in `setup("fit")`, which Lightning calls after the process group exists (DDP) and
before `configure_optimizers`, so the optimizer is built over the injected deltas only.
At the end of training it measures, against a copy of the pre-trained weights, how many
entries changed outside the mask (must be 0) and inside it.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import lightning as L
import torch

from gem.core.gradient_pass import accumulate_gradients, all_reduce_sums, training_loss
from gem.core.sparse_linear import materialize, sparse_modules

log = logging.getLogger(__name__)


class SparseSelection(L.Callback):
    def __init__(self, method, datamodule, *, record=None, run_dir: str | Path | None = None, seed: int = 0,
                 resume_from: str | Path | None = None):
        self.method = method
        # The checkpoint this fit resumes from. Passed in because Lightning sets
        # `trainer.ckpt_path` only after the setup hooks, where the masks must already exist.
        self.resume_from = resume_from
        self.datamodule = datamodule
        self.record = record
        self.run_dir = Path(run_dir) if run_dir else None
        self.seed = seed
        self.reference: dict[str, torch.Tensor] = {}
        self.summary: dict = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.method.selected:
            return
        model = pl_module.model
        model.to(trainer.strategy.root_device)
        if self.method.options["verify_untouched"]:
            # Pre-trained values of everything the method must not change (CPU copy).
            self.reference = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                              if not self.method._is_head(n)}
        if self.resume_from:
            # Resuming: the masks are part of the checkpoint; no new gradient pass (which could
            # differ on non-deterministic hardware). Lightning then restores deltas and optimizer.
            masks = masks_from_checkpoint(self.resume_from)
            self.method.inject_masks(model, {n: idx.to(trainer.strategy.root_device) for n, idx in masks.items()})
            log.info("%s: %d masks restored from %s", self.method.name, len(masks), self.resume_from)
            return
        start = time.perf_counter()
        grads, seen = None, 0
        if self.method.needs_gradients:
            batches = self.datamodule.gradient_pass_dataloader(int(self.method.options["num_grad_samples"]),
                                                               trainer.global_rank, trainer.world_size)
            # The same loss as training (the decoder path scores candidates, not model(**batch).loss).
            loss_fn = getattr(pl_module, "batch_loss", None) or training_loss
            grads, seen = accumulate_gradients(model, batches, self.method.target_weights(model), loss_fn=loss_fn,
                                               squared_per_example=self.method.options["score"] == "fisher",
                                               train_mode=self.method.options["gradient_pass_mode"] == "train")
            grads, seen = all_reduce_sums(grads, seen)
            asked = int(self.method.options["num_grad_samples"])
            if seen < asked:
                log.warning("%s: method.num_grad_samples=%d but the training set holds %d examples; the gradient "
                            "pass used all of them", self.method.name, asked, seen)
        gradient_pass_s = time.perf_counter() - start
        start = time.perf_counter()
        masks = self.method.select(model, grads, seen, seed=self.seed)
        selection_math_s = time.perf_counter() - start
        ranks_agreeing = check_masks_agree_across_ranks(masks)
        tuned = sum(m.numel() for m in masks.values())
        if self.method.total_budget - tuned > len(self.method.targets):  # more than flooring k_l loses
            log.warning("%s: %d of K=%d entries selected: some matrices' shares exceeded their size (or their "
                        "scores were NaN) and the rest is not redistributed, as in the authors' code",
                        self.method.name, tuned, self.method.total_budget)
        self.summary = {
            "budget": self.method.total_budget, "tuned": tuned, "gradient_samples": seen,
            "budgets": dict(self.method.budgets), "gradient_pass_s": round(gradient_pass_s, 3),
            "selection_math_s": round(selection_math_s, 3),
            "delta_init": self.method.options["delta_init"], "threshold": self.method.options["threshold"],
            "ranks_with_identical_masks": ranks_agreeing,
        }
        log.info("%s: %d entries selected of K=%d over %d matrices (gradient pass %.1fs on %d examples)",
                 self.method.name, tuned, self.method.total_budget, len(masks), gradient_pass_s, seen)
        self._save_allocation(trainer)
        self._update_record()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.reference:
            return
        model = pl_module.model
        materialize(model)
        masks = {name: module.indices for name, module in sparse_modules(model)}
        outside = inside = 0
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, before in self.reference.items():
            after = params[name].detach().cpu()
            changed = after.ne(before).view(-1)
            module_name = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and module_name in masks:
                in_mask = torch.zeros_like(changed)
                in_mask[masks[module_name].cpu()] = True
                inside += int((changed & in_mask).sum())
                outside += int((changed & ~in_mask).sum())
            else:
                outside += int(changed.sum())
        self.summary.update(changed_outside_mask=outside, changed_inside_mask=inside)
        if outside:
            log.error("%d entries changed outside the mask: the sparse training is broken", outside)
        self._update_record()

    def state_dict(self) -> dict:
        return {"summary": self.summary}

    def load_state_dict(self, state_dict: dict) -> None:
        self.summary = dict(state_dict.get("summary", {}))
        self._update_record()

    def _update_record(self) -> None:
        if self.record is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            self.record.update(gem=self.summary)

    def _save_allocation(self, trainer: L.Trainer) -> None:
        if self.run_dir is None or trainer.global_rank != 0 or not self.method.allocation:
            return
        rows = self.method.allocation
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


def check_masks_agree_across_ranks(masks: dict[str, torch.Tensor]) -> int:
    """Under DDP, verify every rank selected the same entries; return the number of ranks.

    Each rank holds its own copy of the deltas and DDP averages their gradients, which is
    only meaningful when every rank tuned the same entries.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    # Per matrix: count and an order-sensitive checksum of the flat indices. The summary lives
    # on the masks' device: NCCL (multi-GPU DDP) cannot gather CPU tensors.
    device = next(iter(masks.values())).device if masks else torch.device("cpu")
    summary = torch.tensor([v for idx in masks.values() for v in
                            (idx.numel(), int((idx.cpu() * torch.arange(1, idx.numel() + 1)).sum()))],
                           dtype=torch.long, device=device)
    gathered = [torch.zeros_like(summary) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, summary)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("GEM selected different masks on different DDP ranks; the gradient sums were not "
                           "all-reduced identically (check that every rank sees the same model and data)")
    return len(gathered)


def masks_from_checkpoint(path: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The selected flat indices per matrix, as saved in a Lightning checkpoint's state dict."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    suffix = ".indices"
    masks = {key[len(prefix):-len(suffix)]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith(prefix) and key.endswith(suffix)}
    if not masks:
        raise ValueError(f"checkpoint {path} holds no sparse masks (no '*{suffix}' tensors): was it saved by a "
                         f"run of another method? Resume with the method that made it")
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
