"""Run a preset's table as a resumable two-stage grid, one job at a time.

    python experiments/grid.py --preset cpu_smollm2_table --out results/smollm2 \
        --tasks rte,wic,boolq --methods zero_shot,gem,full,lora --data-dir ../shared/data

Per task (outer loop) and method: stage 1 runs seed 1 at every `lr_index` of the preset's grid;
stage 2 runs the other seeds at the LR chosen on dev, chosen exactly as
`python -m gem.tables OUT --select-by dev` chooses it. `zero_shot` runs every seed once.
Each job is `run.py experiment=PRESET ... hydra.run.dir=OUT/TASK/METHOD_lrI_sS`, the folder
layout and command the committed tables and manifest use.

`--beyond-edges` adds stage 3 where dev chose an end of the grid: seed 1, once, at one LR past
that end, at the grid's own ratio there (1e-3 -> 1e-2 for [1e-5, 1e-4, 1e-3]; 1e-6 -> 2e-7 for
[1e-6, 5e-6, 1e-5]), as an explicit `optim.lr=VALUE` in `OUT/TASK/METHOD_lrVALUE_sS` (never as a
new `lr_index`, which the committed commands rely on). The other seeds follow only if dev then
prefers it, judged as the tables judge it: on the seeds every LR has, ties to the lower LR.

Resumable: a folder whose results.json says `completed` is skipped; a folder left by a killed
job is started again from scratch (`overwrite=true`; these presets keep no checkpoint).
`--commit` commits each finished job's folder alone (`git commit -- FOLDER`), so a session that
ends mid-grid keeps every finished record. `--dry-run` prints the jobs it would run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gem.tables import build_table, load_records  # noqa: E402


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def _position(lr: float, lrs: list[float]) -> int | None:
    return next((i for i, x in enumerate(lrs) if math.isclose(lr, x, rel_tol=1e-9)), None)


def chosen_lr(out: Path, task: str, method: str, among: list[float]) -> float | None:
    """The LR of `among` that `gem.tables --select-by dev` prefers over the runs at those LRs;
    None until every one of them has a run."""
    records = [r for r in load_records([out / task]) if r.get("method") == method
               and _position(float(r["config"]["optim"]["lr"]), among) is not None]
    table = build_table(records, select_by="dev", tasks=[task], methods=[method])
    cells = [row.cells[task] for row in table.rows if task in row.cells]
    if len(cells) != 1 or not cells[0].selected or cells[0].candidates < len(among):
        return None
    return among[_position(float(cells[0].selected["config.optim.lr"]), among)]


def beyond_edge(grid: list[float], lr: float) -> float | None:
    """One LR past the end of `grid` where `lr` sits, at the grid's ratio there; None inside it."""
    lrs = sorted(grid)
    low, second, before_top, top = lrs[0], lrs[1], lrs[-2], lrs[-1]
    if math.isclose(lr, top):
        return float(f"{top * top / before_top:.3g}")
    if math.isclose(lr, low):
        return float(f"{low * low / second:.3g}")
    return None


class Grid:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)

    def job(self, task: str, method: str, seed: int, lr_index: int | None = None, lr: float | None = None) -> bool:
        """Run one job, at grid position `lr_index`, at an explicit `lr`, or with neither at no LR
        (zero-shot), unless its folder holds a completed record; True once it is completed."""
        if lr is not None:
            name, lr_args = f"{method}_lr{lr:g}_s{seed}", [f"seed={seed}", f"optim.lr={lr:g}"]
        elif lr_index is not None:
            name, lr_args = f"{method}_lr{lr_index}_s{seed}", [f"seed={seed}", f"lr_index={lr_index}"]
        else:
            name, lr_args = f"{method}_s{seed}", ["lr_index=null", f"seed={seed}"]
        run_dir = self.out / task / name
        if completed(run_dir):
            return True
        command = [sys.executable, "run.py", f"experiment={self.args.preset}", f"data_dir={self.args.data_dir}",
                   f"task={task}", f"method={method}", *lr_args, *self.args.override, f"hydra.run.dir={run_dir}"]
        if run_dir.exists():
            command.append("overwrite=true")
        print("+", " ".join(command[1:]), flush=True)
        if self.args.dry_run:
            return False
        result = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0 or not completed(run_dir):
            print(f"  failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}", flush=True)
            return False
        if self.args.commit:
            subprocess.run(["git", "add", "--", str(run_dir)], cwd=ROOT, check=True)
            subprocess.run(["git", "commit", "-q", "-m", f"Results: {self.args.preset} {task} {name}",
                            "--", str(run_dir)], cwd=ROOT, check=True)
        return True

    def cell(self, task: str, method: str, grid: list[float]) -> None:
        if method == "zero_shot":
            for seed in self.args.seeds:
                self.job(task, method, seed)
            return
        first, *rest = self.args.seeds
        if not all([self.job(task, method, first, lr_index=i) for i in range(len(grid))]):
            return
        lr = chosen_lr(self.out, task, method, grid)
        if lr is None:
            print(f"  {task}/{method}: no LR chosen on dev; stage 2 skipped", flush=True)
            return
        for seed in rest:
            self.job(task, method, seed, lr_index=grid.index(lr))
        edge = beyond_edge(grid, lr) if self.args.beyond_edges else None
        if edge is None or not self.job(task, method, first, lr=edge):
            return
        if chosen_lr(self.out, task, method, [*grid, edge]) == edge:
            for seed in rest:
                self.job(task, method, seed, lr=edge)

    def run(self) -> None:
        for task in self.args.tasks:
            for method in self.args.methods:
                self.cell(task, method, self.lr_grid(method))

    def lr_grid(self, method: str) -> list[float]:
        """The method's LR grid in the preset (`lr_grids.METHOD`), in `lr_index` order."""
        if method == "zero_shot":
            return []
        from hydra import compose, initialize_config_dir
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose("config", overrides=[f"experiment={self.args.preset}"])
        grid = [float(lr) for lr in cfg.lr_grids.get(method) or []]
        if len(grid) < 2:
            raise SystemExit(f"--methods {method}: the preset {self.args.preset} has no lr_grids.{method} "
                             "with two or more LRs to search")
        return grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="an experiment= preset, e.g. cpu_smollm2_table")
    parser.add_argument("--out", required=True, help="the results root, e.g. results/smollm2")
    parser.add_argument("--tasks", required=True, type=lambda s: s.split(","))
    parser.add_argument("--methods", required=True, type=lambda s: s.split(","))
    parser.add_argument("--seeds", default=[1, 2, 3], type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--data-dir", default=os.environ.get("GEM_DATA_DIR", "../shared/data"))
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra run.py override for every job (repeatable)")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished job's folder")
    parser.add_argument("--beyond-edges", action="store_true",
                        help="where dev chose an end of the grid, try one LR past it (seed 1; the rest if dev prefers it)")
    parser.add_argument("--dry-run", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    Grid(parse_args()).run()
