"""Run a preset's table as a resumable two-stage grid, one job at a time.

    python experiments/grid.py --preset cpu_smollm2_table --out results/smollm2 \
        --tasks rte,wic,boolq --methods zero_shot,gem,full,lora --data-dir ../shared/data

Per task (outer loop) and method: stage 1 runs seed 1 at every `lr_index` of the preset's grid;
stage 2 runs the other seeds at the LR chosen on dev, chosen exactly as
`python -m gem.tables OUT --select-by dev` chooses it. `zero_shot` runs every seed once.
Each job is `run.py experiment=PRESET ... hydra.run.dir=OUT/TASK/METHOD_lrI_sS`, the folder
layout and command the committed tables and manifest use.

Resumable: a folder whose results.json says `completed` is skipped; a folder left by a killed
job is started again from scratch (`overwrite=true`; these presets keep no checkpoint).
`--commit` commits each finished job's folder alone (`git commit -- FOLDER`), so a session that
ends mid-grid keeps every finished record. `--dry-run` prints the jobs it would run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gem.tables import build_table, load_records  # noqa: E402

LR_INDICES = (0, 1, 2)


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def chosen_lr_index(out: Path, task: str, method: str, lrs: dict[float, int]) -> int | None:
    """The lr_index whose seed-1 run(s) `gem.tables --select-by dev` prefers; None until all ran."""
    records = [r for r in load_records([out / task]) if r.get("method") == method]
    table = build_table(records, select_by="dev", tasks=[task], methods=[method])
    cells = [row.cells[task] for row in table.rows if task in row.cells]
    if len(cells) != 1 or not cells[0].selected:
        return None
    lr = float(cells[0].selected["config.optim.lr"])
    return lrs[lr]


class Grid:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)

    def job(self, task: str, method: str, seed: int, lr_index: int | None) -> bool:
        """Run one job unless its folder holds a completed record; True once it is completed."""
        name = f"{method}_s{seed}" if lr_index is None else f"{method}_lr{lr_index}_s{seed}"
        run_dir = self.out / task / name
        if completed(run_dir):
            return True
        command = [sys.executable, "run.py", f"experiment={self.args.preset}", f"data_dir={self.args.data_dir}",
                   f"task={task}", f"method={method}",
                   *(["lr_index=null"] if lr_index is None else []), f"seed={seed}",
                   *([f"lr_index={lr_index}"] if lr_index is not None else []),
                   *self.args.override, f"hydra.run.dir={run_dir}"]
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

    def cell(self, task: str, method: str, lrs: dict[float, int]) -> None:
        if method == "zero_shot":
            for seed in self.args.seeds:
                self.job(task, method, seed, None)
            return
        first, *rest = self.args.seeds
        if not all([self.job(task, method, first, i) for i in LR_INDICES]):
            return
        index = chosen_lr_index(self.out, task, method, lrs)
        if index is None:
            print(f"  {task}/{method}: no LR chosen on dev; stage 2 skipped", flush=True)
            return
        for seed in rest:
            self.job(task, method, seed, index)

    def run(self) -> None:
        for task in self.args.tasks:
            for method in self.args.methods:
                self.cell(task, method, self.lr_positions(method))

    def lr_positions(self, method: str) -> dict[float, int]:
        from hydra import compose, initialize_config_dir
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose("config", overrides=[f"experiment={self.args.preset}"])
        grid = cfg.lr_grids.get(method)
        return {float(lr): i for i, lr in enumerate(grid or [])}


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
    parser.add_argument("--dry-run", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    Grid(parse_args()).run()
