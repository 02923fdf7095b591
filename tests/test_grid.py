"""experiments/grid.py: the resumable two-stage grid (which jobs it runs, in what order, with what LR)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import grid  # noqa: E402


def planned(tmp_path, capsys, *argv) -> list[str]:
    args = grid.parse_args(["--preset", "cpu_smollm2_table", "--out", str(tmp_path), "--data-dir", "../shared/data",
                            "--dry-run", *argv])
    grid.Grid(args).run()
    return [line.split(f"hydra.run.dir={tmp_path}/")[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("+")]


def test_stage_two_runs_the_other_seeds_at_the_lr_chosen_on_dev(tmp_path, capsys):
    # stage 1 of a committed cell (SmolLM2 SST-2, GEM: dev chose lr_index 2 = 1e-3)
    for name in ("gem_lr0_s1", "gem_lr1_s1", "gem_lr2_s1"):
        shutil.copytree(ROOT / "results/smollm2/sst2" / name, tmp_path / "sst2" / name)
    jobs = planned(tmp_path, capsys, "--tasks", "sst2", "--methods", "gem")
    assert jobs == ["sst2/gem_lr2_s2", "sst2/gem_lr2_s3"]


def test_nothing_after_an_unfinished_stage_one_and_killed_folders_start_over(tmp_path, capsys):
    shutil.copytree(ROOT / "results/smollm2/sst2/gem_lr0_s1", tmp_path / "rte" / "gem_lr0_s1")
    killed = tmp_path / "rte" / "gem_lr1_s1"
    killed.mkdir(parents=True)
    (killed / "results.json").write_text(json.dumps({"status": "terminated"}))
    jobs = planned(tmp_path, capsys, "--tasks", "rte", "--methods", "zero_shot,gem")
    assert jobs == ["rte/zero_shot_s1", "rte/zero_shot_s2", "rte/zero_shot_s3",
                    "rte/gem_lr1_s1 overwrite=true", "rte/gem_lr2_s1"]  # no stage 2 until all three finished


def test_lr_positions_come_from_the_preset():
    args = grid.parse_args(["--preset", "cpu_smollm2_table", "--out", "x", "--tasks", "rte", "--methods", "gem"])
    g = grid.Grid(args)
    assert g.lr_positions("gem") == {1e-5: 0, 1e-4: 1, 1e-3: 2}
    assert g.lr_positions("gem_lm") == g.lr_positions("gem")  # the authors' pass searches GEM's grid
    assert g.lr_positions("full") == {1e-6: 0, 5e-6: 1, 1e-5: 2}
