"""experiments/grid.py: the resumable two-stage grid (which jobs it runs, in what order, with what LR)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

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


def test_lr_grids_come_from_the_preset():
    args = grid.parse_args(["--preset", "cpu_smollm2_table", "--out", "x", "--tasks", "rte", "--methods", "gem"])
    g = grid.Grid(args)
    assert g.lr_grid("gem") == [1e-5, 1e-4, 1e-3]
    assert g.lr_grid("gem_lm") == g.lr_grid("gem")  # the authors' pass searches GEM's grid
    assert g.lr_grid("full") == [1e-6, 5e-6, 1e-5]


def test_a_method_without_a_grid_is_refused_by_name():
    args = grid.parse_args(["--preset", "cpu_smollm2_table", "--out", "x", "--tasks", "rte", "--methods", "nope"])
    with pytest.raises(SystemExit, match="--methods nope"):
        grid.Grid(args).lr_grid("nope")


def test_one_lr_past_the_chosen_end_at_the_grids_own_ratio():
    assert grid.beyond_edge([1e-5, 1e-4, 1e-3], 1e-3) == 1e-2
    assert grid.beyond_edge([1e-5, 1e-4, 1e-3], 1e-5) == 1e-6
    assert grid.beyond_edge([1e-6, 5e-6, 1e-5], 1e-6) == 2e-7
    assert grid.beyond_edge([1e-4, 5e-4, 1e-3], 1e-3) == 2e-3
    assert grid.beyond_edge([1e-4, 5e-4, 1e-3], 5e-4) is None


def edge_record(tmp_path: Path, source: str, name: str, lr: float, dev: float) -> None:
    """A copy of a committed record moved to another LR and dev score (a stand-in for a run)."""
    shutil.copytree(ROOT / source, tmp_path / name)
    record = json.loads((tmp_path / name / "results.json").read_text())
    record["config"]["optim"]["lr"] = lr
    record["metrics"]["dev/acc"] = dev
    (tmp_path / name / "results.json").write_text(json.dumps(record))


def committed_cell(tmp_path: Path, task: str, method: str) -> None:
    """A committed cell's runs on the preset's grid (stages 1 and 2), without any LR past its end."""
    for run in sorted((ROOT / "results/smollm2" / task).glob(f"{method}_lr[0-9]_s*")):
        shutil.copytree(run, tmp_path / task / run.name)


def test_beyond_edges_tries_seed_one_past_the_end_dev_chose(tmp_path, capsys):
    committed_cell(tmp_path, "sst2", "gem")  # dev chose 1e-3, the top of [1e-5, 1e-4, 1e-3]
    assert planned(tmp_path, capsys, "--tasks", "sst2", "--methods", "gem") == []
    jobs = planned(tmp_path, capsys, "--tasks", "sst2", "--methods", "gem", "--beyond-edges")
    assert jobs == ["sst2/gem_lr0.01_s1"]
    args = grid.parse_args(["--preset", "cpu_smollm2_table", "--out", str(tmp_path), "--tasks", "sst2",
                            "--methods", "gem", "--beyond-edges", "--dry-run"])
    grid.Grid(args).run()
    assert "method=gem seed=1 optim.lr=0.01 hydra.run.dir=" in capsys.readouterr().out  # an explicit LR, no lr_index
    committed_cell(tmp_path, "rte", "full")  # dev chose 1e-6, the bottom of [1e-6, 5e-6, 1e-5]
    assert planned(tmp_path, capsys, "--tasks", "rte", "--methods", "full", "--beyond-edges") == ["rte/full_lr2e-07_s1"]
    committed_cell(tmp_path, "rte", "gem")  # dev chose 1e-4, inside the grid: nothing beyond
    assert planned(tmp_path, capsys, "--tasks", "rte", "--methods", "gem", "--beyond-edges") == []


@pytest.mark.parametrize("dev, expected", [(0.99, ["sst2/gem_lr0.01_s2", "sst2/gem_lr0.01_s3"]), (0.5, [])])
def test_the_other_seeds_follow_the_edge_lr_only_if_dev_prefers_it(tmp_path, capsys, dev, expected):
    committed_cell(tmp_path, "sst2", "gem")
    edge_record(tmp_path, "results/smollm2/sst2/gem_lr2_s1", "sst2/gem_lr0.01_s1", 0.01, dev)
    assert planned(tmp_path, capsys, "--tasks", "sst2", "--methods", "gem", "--beyond-edges") == expected
