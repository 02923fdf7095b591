"""Figures from run records.

    python -m gem.figures budgets results/ --output budgets.png     # GEM's per-layer q/v budgets per task
    python -m gem.figures density results/ --output density.png     # score against density, per task

`budgets`: for each completed GEM run, the per-matrix budgets (`gem.budgets` of the record,
else the run's `allocation.csv`), averaged over seeds (a seed's selection counts once, whatever
the LR), drawn as one line per task against
the layer index, one panel per projection (q, v, ...) and one panel row per model.

`density`: runs that differ in `config.method.density`, grouped like the table
(`gem.tables.build_table` with `group_by=config.method.density`): mean ± std over seeds
of the metric ×100 against density (%, log axis), one panel per task, one line per method.

The plotting functions return matplotlib Figures; nothing is shown or saved unless asked.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from gem.records import path_sort_key
from gem.tables import (DEFAULT_SWEEP_KEYS, METHOD_LABELS, TASK_LABELS, _is_number, build_table, load_records,
                        lookup, method_sort_key, task_sort_key)

DENSITY_KEY = "config.method.density"
_KIND_ALIASES = {"query": "q", "q_proj": "q", "q": "q", "value": "v", "v_proj": "v", "v": "v",
                 "key": "k", "k_proj": "k", "k": "k", "dense": "o", "out_proj": "o", "o_proj": "o"}
_KIND_ORDER = ("q", "k", "v", "o")
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


# ----------------------------------------------------------------------------- data

def matrix_layer_kind(name: str) -> tuple[int | None, str]:
    """`bert.encoder.layer.3.attention.self.query` -> (3, "q"); `model.layers.0.self_attn.v_proj` -> (0, "v")."""
    match = _LAYER.search(name)
    if match is None:
        numbers = re.findall(r"\.(\d+)\.", name)
        layer = int(numbers[0]) if numbers else None
    else:
        layer = int(match.group(1))
    last = name.rsplit(".", 1)[-1]
    return layer, _KIND_ALIASES.get(last.lower(), last)


def read_allocation(run_dir: str | Path) -> list[dict]:
    """A run's `allocation.csv` (name, numel, budget, r_norm, entropy, ...), numbers as floats."""
    path = Path(run_dir)
    path = path if path.suffix == ".csv" else path / "allocation.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key != "name":
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    pass
    return rows


def record_budgets(record: dict) -> dict[str, float]:
    """The per-matrix budgets of a sparse run: `gem.budgets`, else its `allocation.csv`."""
    budgets = lookup(record, "gem.budgets")
    if isinstance(budgets, dict) and budgets:
        return {str(k): float(v) for k, v in budgets.items()}
    path = record.get("_path")
    if path and not str(path).startswith("wandb:"):
        csv_path = Path(path).parent / "allocation.csv"
        if csv_path.is_file():
            return {r["name"]: float(r["budget"]) for r in read_allocation(csv_path)}
    return {}


def budget_rows(records: Sequence[dict], method: str | None = "gem", density: float | None = None) -> list[dict]:
    """Per (model, task, kind, layer): the budget averaged over the distinct selections (seeds).

    A selection does not depend on the learning rate, so runs of one seed at several LRs (an LR
    search) hold the same budgets: such duplicates count once (`runs` = distinct selections).
    Matrices of the same kind in the same layer (rare) are summed before averaging. Budgets of
    different densities are never averaged together: pass `density` to draw one of them; without
    it, a (model, task) with runs at several densities is an error naming them.
    """
    per_run: dict[tuple, dict[tuple, float]] = {}
    densities: dict[tuple, set] = defaultdict(set)
    for record in sorted(records, key=lambda r: path_sort_key(str(r.get("_path", "")))):
        if record.get("status") != "completed" or (method and record.get("method") != method):
            continue
        budgets = record_budgets(record)
        if not budgets:
            continue
        if density is not None and not _same_number(lookup(record, DENSITY_KEY), density):
            continue
        model, task = str(record.get("model")), str(record.get("task"))
        densities[(model, task)].add(lookup(record, DENSITY_KEY))
        run_key = (model, task, str(record.get("seed")), tuple(sorted(budgets.items())))
        sums: dict[tuple, float] = defaultdict(float)
        for name, budget in budgets.items():
            layer, kind = matrix_layer_kind(name)
            sums[(kind, -1 if layer is None else layer)] += budget
        per_run.setdefault(run_key, sums)
    mixed = {f"{m}/{t}": sorted(map(str, d)) for (m, t), d in densities.items() if len(d) > 1}
    if mixed:
        raise ValueError(f"budgets of different densities would be averaged together ({mixed}); "
                         "choose one (`--density D`, `density=D`) or give only one density's run folders")
    grouped: dict[tuple, list[float]] = defaultdict(list)
    for (model, task, _, _), sums in per_run.items():
        for (kind, layer), budget in sums.items():
            grouped[(model, task, kind, layer)].append(budget)
    return [{"model": m, "task": t, "kind": k, "layer": layer, "budget": math.fsum(v) / len(v), "runs": len(v)}
            for (m, t, k, layer), v in sorted(grouped.items(), key=lambda kv: (
                kv[0][0], task_sort_key(kv[0][1]), _kind_key(kv[0][2]), kv[0][3]))]


def _same_number(value, target: float) -> bool:
    return _is_number(value) and math.isclose(value, target)


def density_points(records: Sequence[dict], *, metric: str | None = None, select_by: str | None = None,
                   sweep_keys: Sequence[str] = DEFAULT_SWEEP_KEYS, tasks: Sequence[str] | None = None,
                   methods: Sequence[str] | None = None) -> list[dict]:
    """(model, method, task, density, mean, std, n) for every cell of the density-grouped table."""
    table = build_table(records, metric=metric, group_by=[DENSITY_KEY], select_by=select_by, sweep_keys=sweep_keys,
                        tasks=tasks, methods=methods)
    points = []
    for row in table.rows:
        density = row.group_values[0]
        if not isinstance(density, (int, float)) or isinstance(density, bool):
            continue
        for task, cell in row.cells.items():
            points.append({"model": row.model, "method": row.method, "task": task, "density": float(density),
                           "mean": cell.mean, "std": cell.std or 0.0, "n": cell.n})
    return sorted(points, key=lambda p: (task_sort_key(p["task"]), p["model"], method_sort_key(p["method"]),
                                         p["density"]))


def _kind_key(kind: str) -> tuple:
    return (_KIND_ORDER.index(kind), "") if kind in _KIND_ORDER else (len(_KIND_ORDER), kind)


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _empty(message: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    return fig


def plot_budgets(records: Sequence[dict], *, method: str | None = "gem", tasks: Sequence[str] | None = None,
                 normalize: bool = False, density: float | None = None):
    """Per-layer budgets per task: panels = projections (q, v, ...) × models, lines = tasks."""
    rows = budget_rows([r for r in records if not tasks or r.get("task") in tasks], method, density)
    if not rows:
        return _empty(f"no completed {method or 'sparse'} runs with budgets")
    if normalize:
        totals: dict[tuple, float] = defaultdict(float)
        for r in rows:
            totals[(r["model"], r["task"])] += r["budget"]
        rows = [{**r, "budget": 100.0 * r["budget"] / totals[(r["model"], r["task"])]} for r in rows]
    models = sorted({r["model"] for r in rows})
    kinds = sorted({r["kind"] for r in rows}, key=_kind_key)
    task_list = sorted({r["task"] for r in rows}, key=task_sort_key)
    plt = _pyplot()
    fig, axes = plt.subplots(len(models), len(kinds), figsize=(4.5 * len(kinds), 3.2 * len(models)),
                             squeeze=False, sharey="row")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            for t, task in enumerate(task_list):
                points = sorted((r["layer"], r["budget"]) for r in rows
                                if r["model"] == model and r["kind"] == kind and r["task"] == task)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3,
                            color=colors[t % len(colors)], label=TASK_LABELS.get(task, task))
            layers = sorted({r["layer"] for r in rows if r["model"] == model})
            ax.set_xticks(layers[::max(1, math.ceil(len(layers) / 16))])  # deep models: every k-th label
            ax.set_title(f"{model}: {kind}" if len(models) > 1 else kind)
            ax.set_xlabel("layer")
            if j == 0:
                ax.set_ylabel("budget (% of total)" if normalize else "budget (entries)")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{METHOD_LABELS.get(method, method) if method else 'sparse'}: per-layer budgets across tasks")
    fig.tight_layout()
    return fig


def plot_density(records: Sequence[dict], *, metric: str | None = None, select_by: str | None = None,
                 sweep_keys: Sequence[str] = DEFAULT_SWEEP_KEYS, tasks: Sequence[str] | None = None,
                 methods: Sequence[str] | None = None):
    """Score (×100, mean ± std over seeds) against density (%), one panel per task, one line per method.

    Tasks run at a single density (e.g. a main table's runs read along with a sweep) have no
    curve and get no panel."""
    points = density_points(records, metric=metric, select_by=select_by, sweep_keys=sweep_keys, tasks=tasks,
                            methods=methods)
    swept = {t for t in {p["task"] for p in points} if len({p["density"] for p in points if p["task"] == t}) > 1}
    points = [p for p in points if p["task"] in swept]
    if not points:
        return _empty(f"no task with completed runs at two or more values of {DENSITY_KEY}")
    task_list = sorted({p["task"] for p in points}, key=task_sort_key)
    models = sorted({p["model"] for p in points})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(task_list), figsize=(4.2 * len(task_list), 3.4), squeeze=False)
    for ax, task in zip(axes[0], task_list):
        lines = sorted({(p["model"], p["method"]) for p in points if p["task"] == task},
                       key=lambda mm: (mm[0], method_sort_key(mm[1])))
        for model, method in lines:
            pts = [p for p in points if p["task"] == task and p["model"] == model and p["method"] == method]
            label = METHOD_LABELS.get(method, method) + (f" ({model})" if len(models) > 1 else "")
            ax.errorbar([100.0 * p["density"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                        marker="o", ms=4, capsize=3, label=label)
        ax.set_xscale("log")
        xs = sorted({100.0 * p["density"] for p in points if p["task"] == task})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("density (% of parameters)")
        ax.set_title(TASK_LABELS.get(task, task))
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"{metric or 'test main metric'} ×100")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_allocation(rows: Sequence[dict], title: str = ""):
    """One run's allocation (rows of `allocation.csv`): budget, ||r|| and H per matrix, as bar panels."""
    keys = [k for k in ("budget", "r_norm", "entropy") if rows and k in rows[0]]
    if not keys:
        return _empty("no allocation rows")
    names = [_short_name(r["name"]) for r in rows]
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(6.0, 0.35 * len(rows)), 2.2 * len(keys)), sharex=True,
                             squeeze=False)
    colors = {"q": "tab:blue", "v": "tab:orange", "k": "tab:green", "o": "tab:red"}
    bar_colors = [colors.get(matrix_layer_kind(r["name"])[1], "tab:gray") for r in rows]
    labels = {"budget": "budget k", "r_norm": "||r||", "entropy": "H"}
    for ax, key in zip(axes[:, 0], keys):
        ax.bar(range(len(rows)), [float(r[key]) for r in rows], color=bar_colors)
        ax.set_ylabel(labels[key])
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
    axes[0, 0].set_title(f"{title}: per-matrix allocation" if title else "per-matrix allocation")
    fig.tight_layout()
    return fig


def _short_name(name: str) -> str:
    layer, kind = matrix_layer_kind(name)
    return f"L{layer}.{kind}" if layer is not None else name


# ----------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gem.figures", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    budgets = sub.add_parser("budgets", help="per-layer q/v budgets of GEM runs across tasks")
    budgets.add_argument("--method", default="gem", help="the sparse method whose budgets to draw (default gem)")
    budgets.add_argument("--normalize", action="store_true", help="budgets as %% of each task's total")
    budgets.add_argument("--density", type=float, help="only runs at this config.method.density (needed when "
                                                        "the folders hold several)")
    density = sub.add_parser("density", help="score against config.method.density, per task")
    density.add_argument("--metric", help="metric key (default: each task's main test metric)")
    density.add_argument("--select-by", choices=["dev"], help="choose the sweep setting (LR) per point on dev")
    density.add_argument("--sweep-key", action="append", metavar="KEY", help="default: config.optim.lr")
    density.add_argument("--methods", help="comma-separated methods (default: all with a density)")
    for p in (budgets, density):
        p.add_argument("paths", nargs="+", help="folders searched recursively for results.json")
        p.add_argument("--tasks", help="comma-separated tasks (default: all)")
        p.add_argument("--output", "-o", required=True, help="the PNG to write")
        p.add_argument("--dpi", type=int, default=150)
    args = parser.parse_args(argv)
    try:
        records = load_records(args.paths)
    except FileNotFoundError as error:
        parser.error(str(error))
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    import matplotlib

    matplotlib.use("Agg")
    if args.figure == "budgets":
        try:
            fig = plot_budgets(records, method=args.method, tasks=split(args.tasks), normalize=args.normalize,
                               density=args.density)
        except ValueError as error:
            parser.error(str(error))
    else:
        keys = [k for v in args.sweep_key or [] for k in v.split(",") if k] or DEFAULT_SWEEP_KEYS
        fig = plot_density(records, metric=args.metric, select_by=args.select_by, sweep_keys=keys,
                           tasks=split(args.tasks), methods=split(args.methods))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
