"""Sweeps as researchers run them.

A multirun in which one job fails loses nothing: the other jobs still run and keep complete
records, the failing job leaves a `failed` record, the command exits non-zero, and the table
lists the failed run in its footer. A two-stage LR sweep (every LR on seed 1, then more seeds
at the dev winner) runs from the table command's `--format overrides`.

Hydra 1.3's basic launcher runs every job of a batch (the whole sweep here) even when one
raises, and re-raises the first failure only after all of them finished; the failing job is
listed first so a launcher that stopped at the first failure would be caught.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env, run_cli
from gem.tables import build_table, load_records

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = tmp / "sweep"
    args = ["-m", "task.num_train=0,16", "method=bitfit", "task=rte", "model=tiny-bert", "logger=none",
            "trainer.max_epochs=1", "trainer.accelerator=cpu", "task.num_dev=8", "task.num_test=8",
            "task.max_length=64", "save_checkpoint=false", f"data_dir={data_dir}", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, cwd=tmp)
    records = {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))}
    return proc, sweep, records


def test_failing_job_does_not_stop_the_others(failing_sweep):
    proc, sweep, records = failing_sweep
    assert proc.returncode != 0  # one job failed, so the sweep as a whole did
    assert "Error executing job with overrides" in proc.stderr and "task.num_train=0" in proc.stderr
    assert "the sampled train split is empty" in proc.stderr
    assert sorted(records) == ["0_rte_bitfit_tiny-bert_s1", "1_rte_bitfit_tiny-bert_s1"]

    failed, completed = records["0_rte_bitfit_tiny-bert_s1"], records["1_rte_bitfit_tiny-bert_s1"]
    assert failed["status"] == "failed"
    assert failed["error"].startswith("DataError: task rte: the sampled train split is empty")
    assert "traceback" in failed and "finished_at" in failed
    assert failed["config"]["task"]["num_train"] == 0

    assert completed["status"] == "completed"
    assert completed["data"]["sizes"]["train"] == 16
    assert completed["main_metric"] == "test/acc" and {"dev/acc", "test/acc"} <= set(completed["metrics"])
    assert completed["params"]["tuned"] > 0 and "total" in completed["time_s"]
    assert "error" not in completed
    assert (sweep / "multirun.yaml").exists()


def test_table_footer_lists_the_failed_job(failing_sweep):
    _, sweep, _ = failing_sweep
    proc = subprocess.run([sys.executable, "-m", "gem.tables", str(sweep)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| BitFit |" in proc.stdout and "(1)" in proc.stdout  # the completed job, one seed
    footer = [line for line in proc.stdout.splitlines() if line.startswith("- left out:")]
    assert footer == [f"- left out: 1 failed: {sweep / '0_rte_bitfit_tiny-bert_s1' / 'results.json'}"]


def test_two_stage_lr_sweep_with_the_overrides_format(tmp_path, data_dir):
    # Stage 1: the preset's two LRs on seed 1. Stage 2: seeds 2-3 at the LR that won on dev,
    # fed from `gem.tables --format overrides`. The table then reports that LR over 3 seeds.
    tiny = ["experiment=cpu_minilm_table", "model=tiny-bert", "logger=none", "trainer.max_epochs=1",
            "trainer.accelerator=cpu", "task.num_train=16", "task.num_dev=8", "task.num_test=8", "task.max_length=64",
            f"data_dir={data_dir}"]
    stage1 = run_cli(["-m", *tiny, "task=cb", "method=bitfit", "seed=1", f"hydra.sweep.dir={tmp_path / 's1'}"],
                     cwd=tmp_path)
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    assert len(list((tmp_path / "s1").rglob("results.json"))) == 2  # lr_index 0 and 1
    chosen = subprocess.run([sys.executable, "-m", "gem.tables", str(tmp_path / "s1"), "--select-by", "dev",
                             "--sweep-key", "config.lr_index", "--format", "overrides"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert chosen[:3] == ["model=tiny-bert", "task=cb", "method=bitfit"] and chosen[3] in ("lr_index=0", "lr_index=1")
    stage2 = run_cli(["-m", *tiny, *chosen, "seed=2,3", f"hydra.sweep.dir={tmp_path / 's2'}"], cwd=tmp_path)
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    second = [json.loads(p.read_text()) for p in (tmp_path / "s2").rglob("results.json")]
    assert sorted(r["seed"] for r in second) == [2, 3]
    assert {r["config"]["lr_index"] for r in second} == {int(chosen[3].split("=")[1])}
    table = build_table(load_records([tmp_path / "s1", tmp_path / "s2"]), select_by="dev",
                        sweep_keys=["config.lr_index"])
    cell = table.rows[0].cells["cb"]
    assert cell.n == 3 and cell.selected == {"config.lr_index": chosen[3].split("=")[1]}
