"""How stable GEM's selection is: Jaccard overlap of masks across gradient-pass sizes and data seeds.

No training. Per (model, task, data seed) one gradient pass over the first `--max-examples`
(1000, the paper's pass) examples of run.py's sampled training set, with run.py's collator,
loader (`TaskDataModule.gradient_pass_dataloader`) and training loss (the module's
`batch_loss`; on decoders the candidate-scoring cross-entropy). Gradient sums add up, so the
running sums after the first 32, 64, 128, 256, 500 examples (`--sizes`) are the sums a pass over
only those examples would make: every prefix's mask comes from the same pass, by the library's
own math (`gem.tuner.select.masks_from_sums`, which `select_entries` calls). Two rules from the
same sums: GEM (ratio score, entropy budgets) and gem_uniform (ratio, uniform budgets), at the
configs' density (0.001).

Measured, per model x task x rule:
- prefix curve (first seed): the overall Jaccard |A n B| / |A u B| over all (matrix, flat index)
  pairs of the mask at N examples with the mask at `--max-examples`, per matrix too, and the
  budget shift sum_l |k_l - k_l_ref| / 2K (the fraction of K that moved between matrices);
- seeds: the same between the `--max-examples` masks of every pair of data seeds. As with
  run.py's `seed`, a seed draws another training sample and (encoders) another random
  classifier head (seeded before the model loads), so both move the gradients.
- chance: the Jaccard two independent uniformly random masks with these budgets would have.

The pass's batch size is `--batch-size` (4), which divides every size, so each prefix is whole
batches: its running sum is bit for bit what `select_entries` computes over the same first N
examples at that batch size (tests/test_stability.py checks it). The loss is a batch mean, so with
full batches the batch size only scales G, which leaves scores' order and budget shares as they
are (up to rounding); run.py's own batch sizes (16, 8) do not divide 500.

    python experiments/stability.py --models minilm,smollm2-135m --tasks sst2,rte \
        --data-dir ../shared/data --out results/stability --threads 1

writes results/stability/stability.json (every number), table.md and jaccard.png; the masks
of each pass are cached in <out>/masks/ (not committed), so a killed run resumes. `--threads 1`
on shared cores: torch's two threads on busy cores ran several times slower here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from itertools import combinations
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python experiments/stability.py` from the repository root
    sys.path.insert(0, str(REPO))

log = logging.getLogger("stability")

RULES = ("gem", "gem_uniform")  # method configs (conf/method/): ratio+entropy, ratio+uniform
DEFAULT_SIZES = (32, 64, 128, 256, 500)


def compose(overrides: list[str]):
    """The run config as `python run.py <overrides>` builds it (Hydra's compose API, conf/ tree)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import gem  # noqa: F401  (registers the OmegaConf resolvers the configs use, as run.py does)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


class Setup:
    """One (model, task, seed) as run.py builds it: model, loss, gradient-pass loader, the rules' configs."""

    def __init__(self, model_name: str, task_name: str, seed: int, data_dir: str | None, batch_size: int,
                 extra_overrides: list[str] = ()):
        import lightning as L
        from omegaconf import OmegaConf

        from gem.data import encoder_collator, load_task
        from gem.data.causal_collate import causal_collator
        from gem.lit.causal_module import CausalLMModule
        from gem.lit.datamodule import TaskDataModule
        from gem.lit.module import FineTuneModule
        from gem.models import load_model
        from gem.methods import method_from_config
        from gem.models import fit_max_length
        from gem.tuner.select import target_layers

        base = [f"model={model_name}", f"task={task_name}", f"seed={seed}", f"batch_size={batch_size}",
                *([f"data_dir={data_dir}"] if data_dir else []), *extra_overrides]
        self.cfgs = {rule: compose([*base, f"method={rule}"]) for rule in RULES}
        cfg = self.cfgs["gem"]
        # The order of gem/train.py `_run`: seed, task sample, model (a head's init draws from the seed).
        L.seed_everything(int(cfg.seed), workers=True)
        self.task = load_task(cfg.task, cfg.data_dir, int(cfg.seed))
        loaded = load_model(cfg.model, self.task.kind, self.task.num_labels)
        self.methods = {rule: method_from_config(c) for rule, c in self.cfgs.items()}
        for method in self.methods.values():  # freezes the model, fills each config's task type and K
            self.model = method.prepare(loaded.model, loaded.head_parameter_names)
        self.configs = {rule: m.config for rule, m in self.methods.items()}
        method = self.methods["gem"]
        requested = int(cfg.model.get("max_length") or cfg.task.max_length) if loaded.kind == "decoder" \
            else int(cfg.task.max_length)
        self.max_length, _ = fit_max_length(requested, loaded.model, loaded.tokenizer)
        optim = OmegaConf.to_container(cfg.optim, resolve=True)
        if loaded.kind == "decoder":  # as `_run`: prompts + candidate scoring
            generation = OmegaConf.to_container(cfg.task.generation, resolve=True) if cfg.task.get("generation") else {}
            collate = causal_collator(loaded.tokenizer, self.task, self.max_length,
                                      int(generation.get("max_new_tokens", 0)))
            self.module = CausalLMModule(self.model, method, task_name=self.task.name, task_kind=self.task.kind,
                                         metric_names=list(self.task.metrics), num_labels=self.task.num_labels,
                                         optim=optim, tokenizer=loaded.tokenizer, generation=generation)
        else:
            collate = encoder_collator(loaded.tokenizer, self.task, self.max_length)
            self.module = FineTuneModule(self.model, method, task_kind=self.task.kind,
                                         metric_names=list(self.task.metrics), num_labels=self.task.num_labels,
                                         optim=optim)
        self.datamodule = TaskDataModule(self.task, collate, batch_size=int(cfg.batch_size),
                                         eval_batch_size=int(cfg.eval_batch_size), seed=int(cfg.seed),
                                         num_workers=int(cfg.num_workers))
        self.weights = {n: m.weight for n, m in target_layers(self.model, self.configs["gem"]).items()}
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        for rule, config in self.configs.items():  # the rules differ only in the budget split
            if (config.score, config.gradient_pass_mode, config.gradient_pass_loss) != ("ratio", "eval", "task"):
                raise ValueError(f"{rule}: this study shares one task-loss, eval-mode pass between the rules; "
                                 f"got score={config.score}, gradient_pass_mode={config.gradient_pass_mode}, "
                                 f"gradient_pass_loss={config.gradient_pass_loss}")

    def loss_fn(self, model, batch):
        return self.module.batch_loss(model, batch)


def prefix_masks(setup: Setup, sizes: list[int], total: int) -> tuple[dict[str, dict[int, dict]], dict]:
    """One gradient pass over the first `total` examples; the masks of every rule at every size in
    `sizes` (and `total`): {rule: {size: {matrix: sorted flat indices}}}, and the pass's facts."""
    from gem.core.gradient_pass import accumulate_gradients
    from gem.tuner.select import masks_from_sums

    batch_size = setup.datamodule.batch_size
    ends = sorted({*sizes, total})
    if any(n % batch_size for n in ends):
        raise ValueError(f"every size ({ends}) must be a multiple of the batch size {batch_size}, so that each "
                         f"prefix is whole batches (a cut batch would weigh its examples differently)")
    if len(setup.task.train) < total:
        raise ValueError(f"{setup.task.name}: the sampled training set holds {len(setup.task.train)} examples, "
                         f"fewer than --max-examples={total}")
    masks: dict[str, dict[int, dict]] = {rule: {} for rule in RULES}
    running, seen = None, 0
    start = time.perf_counter()
    detached = {n: w.detach() for n, w in setup.weights.items()}
    # One batch per call: its sum is that batch's gradient, added here in batch order, which is the
    # same fp32 addition, in the same order, as the running `.grad` of a pass over all the batches.
    for batch in setup.datamodule.gradient_pass_dataloader(total):
        grads, count = accumulate_gradients(setup.model, [batch], setup.weights, loss_fn=setup.loss_fn)
        if running is None:
            running = {n: g.detach().clone() for n, g in grads.items()}
        else:
            for n, g in grads.items():
                running[n].add_(g)
        seen += count
        if seen in ends:
            for rule, config in setup.configs.items():
                chosen = masks_from_sums(config, detached, running, seen, setup.num_parameters)
                masks[rule][seen] = {n: idx.to(torch.int32) for n, idx in chosen.indices.items()}
            log.info("%d/%d examples, %.0fs", seen, total, time.perf_counter() - start)
    if seen != total:
        raise RuntimeError(f"the gradient pass saw {seen} examples, expected {total}")
    facts = {"examples": seen, "gradient_pass_s": round(time.perf_counter() - start, 1),
             "train_examples": len(setup.task.train), "max_length": setup.max_length,
             "batch_size": batch_size, "total_budget": {r: c.total_budget for r, c in setup.configs.items()},
             "matrix_sizes": {n: w.numel() for n, w in setup.weights.items()}}
    return masks, facts


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], sizes: dict[str, int], K: int) -> dict:
    """Jaccard of two masks (per matrix and over all (matrix, index) pairs), budget shift, chance."""
    per_matrix, inter_all, union_all, chance_inter, shift = {}, 0, 0, 0.0, 0
    for name, n in sizes.items():
        x = a.get(name, torch.empty(0, dtype=torch.int32))
        y = b.get(name, torch.empty(0, dtype=torch.int32))
        inter = int(torch.isin(x, y).sum())
        union = x.numel() + y.numel() - inter
        per_matrix[name] = inter / union if union else None  # both empty: undefined
        inter_all += inter
        union_all += union
        chance_inter += x.numel() * y.numel() / n  # E|A n B| for independent uniform draws of those sizes
        shift += abs(x.numel() - y.numel())
    chance_union = sum(a[n].numel() for n in a) + sum(b[n].numel() for n in b) - chance_inter
    return {"jaccard": inter_all / union_all if union_all else 1.0, "budget_shift": shift / (2 * K),
            "chance_jaccard": chance_inter / chance_union if chance_union else 0.0, "per_matrix": per_matrix}


def measure(models: list[str], tasks: list[str], seeds: list[int], sizes: list[int], total: int, data_dir: str | None,
            out: Path, batch_size: int = 4, overrides: list[str] = (), skip: frozenset = frozenset()) -> dict:
    """Every pass (cached in out/masks), then the comparisons: the data of stability.json."""
    cache = out / "masks"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("*\n")  # a rerun's cache (megabytes of indices), never committed
    cells, passes = [], []
    for model_name in models:
        for task_name in tasks:
            if f"{model_name}:{task_name}" in skip:
                continue
            masks, facts = {}, {}
            for seed in seeds:
                path = cache / f"{model_name}_{task_name}_seed{seed}_n{total}_b{batch_size}.pt"
                key = {"sizes": sorted({*sizes, total}), "overrides": list(overrides)}
                saved = torch.load(path, weights_only=True) if path.is_file() else None
                if saved is not None and saved["key"] == key:
                    masks[seed], facts[seed] = saved["masks"], saved["facts"]
                    log.info("%s %s seed %d: masks from %s", model_name, task_name, seed, path)
                else:
                    log.info("%s %s seed %d: gradient pass over %d examples", model_name, task_name, seed, total)
                    setup = Setup(model_name, task_name, seed, data_dir, batch_size, list(overrides))
                    masks[seed], facts[seed] = prefix_masks(setup, sizes, total)
                    del setup
                    torch.save({"key": key, "masks": masks[seed], "facts": facts[seed]}, path)
                passes.append({"model": model_name, "task": task_name, "seed": seed, **facts[seed]})
            first = seeds[0]
            matrix_sizes = facts[first]["matrix_sizes"]
            for rule in RULES:
                K = facts[first]["total_budget"][rule]
                reference = masks[first][rule][total]
                prefix = [{"size": n, **compare(masks[first][rule][n], reference, matrix_sizes, K)}
                          for n in sorted({*sizes, total})]
                prefix_by_seed = {str(s): [{"size": n, **_summary(compare(masks[s][rule][n], masks[s][rule][total],
                                                                          matrix_sizes, K))}
                                           for n in sorted(sizes)] for s in seeds}
                pairs = [{"seeds": [s, t], **compare(masks[s][rule][total], masks[t][rule][total], matrix_sizes, K)}
                         for s, t in combinations(seeds, 2)]
                cells.append({"model": model_name, "task": task_name, "rule": rule, "total_budget": K,
                              "reference_size": total, "prefix_seed": first, "prefix": prefix,
                              "prefix_by_seed": prefix_by_seed, "seed_pairs": pairs,
                              "budgets": {str(s): {n: int(idx.numel()) for n, idx in masks[s][rule][total].items()}
                                          for s in seeds}})
    return {"settings": {"models": models, "tasks": tasks, "seeds": seeds, "sizes": sorted(sizes),
                         "reference_size": total, "batch_size": batch_size, "rules": list(RULES),
                         "overrides": list(overrides)},
            "passes": passes, "cells": cells}


def _summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "per_matrix"}


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def table(data: dict) -> str:
    """Markdown: overall Jaccard with the reference-size mask per prefix size, across seeds, shifts."""
    sizes, total = data["settings"]["sizes"], data["settings"]["reference_size"]
    seeds = data["settings"]["seeds"]
    head = ["model", "task", "rule", *[f"J {n}" for n in sizes], f"J seeds @{total}", f"shift {sizes[0]}",
            f"shift seeds", "chance J"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in data["cells"]:
        at = {p["size"]: p for p in cell["prefix"]}
        pairs = cell["seed_pairs"]
        if pairs:
            js = [p["jaccard"] for p in pairs]
            seed_j = f"{sum(js) / len(js):.3f} ({min(js):.3f}-{max(js):.3f})"
            seed_shift = _fmt(sum(p["budget_shift"] for p in pairs) / len(pairs))
        else:
            seed_j = seed_shift = "-"
        lines.append("| " + " | ".join([cell["model"], cell["task"], cell["rule"],
                                        *[_fmt(at[n]["jaccard"]) for n in sizes], seed_j,
                                        _fmt(at[sizes[0]]["budget_shift"]), seed_shift,
                                        f"{at[sizes[0]]['chance_jaccard']:.1e}"]) + " |")
    notes = (f"\nJ n: overall Jaccard (all (matrix, flat index) pairs) of the mask from the first n training "
             f"examples with the mask from the first {total}, data seed {seeds[0]}. J seeds: mean (min-max) over "
             f"the pairs of seeds {', '.join(map(str, seeds))} at {total} examples (another training sample and, "
             f"for encoders, another random head). shift: the fraction of K that moved between matrices "
             f"(sum |k_l - k_l'| / 2K; 0 for uniform budgets), at n={sizes[0]} and mean over seed pairs. "
             f"chance J: two independent uniform random masks with the same budgets. Density 0.001, batch size "
             f"{data['settings']['batch_size']}, made by `{data.get('command', 'experiments/stability.py')}`.\n")
    return "\n".join(lines) + "\n" + notes


def figure(data: dict, path: Path) -> Path:
    """Left: overall Jaccard vs gradient-pass size (one line per model x task x rule, first seed);
    right: the Jaccard between data seeds at the reference size (mean, min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = data["settings"]["reference_size"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    keys = sorted({(c["model"], c["task"]) for c in data["cells"]})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(keys)}
    labels, means, lows, highs, bar_colors, hatches = [], [], [], [], [], []
    for cell in data["cells"]:
        key, uniform = (cell["model"], cell["task"]), cell["rule"] != "gem"
        xs = [p["size"] for p in cell["prefix"]]
        ys = [p["jaccard"] for p in cell["prefix"]]
        ax.plot(xs, ys, marker="o", ms=3, color=colors[key], ls="--" if uniform else "-",
                label=f"{cell['model']} {cell['task']} {cell['rule']}")
        if cell["seed_pairs"]:
            js = [p["jaccard"] for p in cell["seed_pairs"]]
            mean = sum(js) / len(js)
            labels.append(f"{cell['model']}\n{cell['task']} {'unif' if uniform else 'gem'}")
            means.append(mean)
            lows.append(mean - min(js))
            highs.append(max(js) - mean)
            bar_colors.append(colors[key])
            hatches.append("//" if uniform else "")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["size"] for p in data["cells"][0]["prefix"]],
                  [str(p["size"]) for p in data["cells"][0]["prefix"]])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("examples in the gradient pass")
    ax.set_ylabel(f"Jaccard with the {total}-example mask")
    ax.set_title(f"mask vs gradient-pass size (seed {data['settings']['seeds'][0]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", handlelength=3)
    if means:
        bars = bx.bar(range(len(means)), means, yerr=[lows, highs], color=bar_colors, capsize=3)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        bx.set_xticks(range(len(means)), labels, fontsize=7, rotation=45, ha="right")
        bx.set_ylim(0, 1.02)
        bx.set_title(f"between data seeds at {total} (mean, min-max)")
        bx.grid(alpha=0.3, axis="y")
    else:
        bx.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _csv(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,smollm2-135m", help="model configs (conf/model/)")
    parser.add_argument("--tasks", default="sst2,rte", help="task configs (conf/task/)")
    parser.add_argument("--seeds", default="1,2,3", help="data seeds (run.py's seed); the prefix curve uses the first")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="gradient-pass sizes compared")
    parser.add_argument("--max-examples", type=int, default=1000, help="the reference pass's size (the paper's 1000)")
    parser.add_argument("--batch-size", type=int, default=4, help="gradient-pass batch size (divides every size)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: GEM_DATA_DIR)")
    parser.add_argument("--out", default="results/stability", help="folder for stability.json, table.md, jaccard.png")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip", default="", help="model:task cells to leave out, comma-separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sorted(n for n in _csv(args.sizes, int) if n < args.max_examples)
    if not sizes:
        raise SystemExit("--sizes: give at least one size below --max-examples")
    out = Path(args.out)
    data = measure(_csv(args.models), _csv(args.tasks), _csv(args.seeds, int), sizes, args.max_examples,
                   args.data_dir, out, args.batch_size, args.override, frozenset(_csv(args.skip)))
    data["command"] = "python experiments/stability.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "stability.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "table.md").write_text(table(data))
    figure(data, out / "jaccard.png")
    print(table(data))
    return data


if __name__ == "__main__":
    main()
