"""The run pipeline as users drive it: run folders, multiruns, loggers, and fast clear failures.

Subprocess tests run `python run.py ...` (what users type), with stdin closed so that any
prompt would fail instead of hanging; in-process tests compose the same configs with Hydra.
Nothing here contacts a server: wandb is offline, or fails before it would go online.
"""

from __future__ import annotations

import csv
import json
import time
from itertools import product

import pytest
import torch
from lightning.pytorch import Callback

from conftest import TINY_RUN, cli_env, compose, offline_env, run_cli, run_in_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CLI_TINY = [o for o in TINY_RUN if not o.startswith("logger=")]


# --------------------------------------------------------------------------- hydra.run.dir + wandb offline
@pytest.fixture(scope="module")
def wandb_offline_cli_run(tmp_path_factory, data_dir):
    """One `python run.py ... logger=wandb hydra.run.dir=SOME/DIR` with no key, no netrc, empty HOME."""
    tmp = tmp_path_factory.mktemp("cli_run")
    home = tmp / "home"
    home.mkdir()
    run_dir = tmp / "some" / "dir"
    env = cli_env(HOME=str(home))
    env.pop("NETRC", None)
    assert "WANDB_API_KEY" not in env and "WANDB_MODE" not in env
    proc = run_cli([*CLI_TINY, "method=bitfit", "logger=wandb", f"data_dir={data_dir}", f"hydra.run.dir={run_dir}"],
                   cwd=tmp, env=env)
    return proc, run_dir, home


def test_hydra_run_dir_holds_the_record(wandb_offline_cli_run):
    proc, run_dir, _ = wandb_offline_cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed"
    assert record["config"]["paths"]["output_dir"] == str(run_dir)
    # the command-line overrides, for gem.manifest (hydra.* ones are Hydra's own)
    assert record["overrides"] == [*CLI_TINY, "method=bitfit", "logger=wandb", f"data_dir={record['config']['data_dir']}"]
    assert (run_dir / "checkpoint" / "trained.safetensors").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_wandb_offline_needs_no_key_and_never_prompts(wandb_offline_cli_run):
    proc, run_dir, home = wandb_offline_cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = (proc.stdout + proc.stderr).lower()
    for prompt in ("enter your choice", "api key", "wandb login", "create a w&b account"):
        assert prompt not in output
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (run_dir / "wandb").iterdir())
    assert not (home / ".netrc").exists()


# --------------------------------------------------------------------------- multirun
def test_multirun_writes_one_record_per_job(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    args = ["-m", "method=full,bitfit", "task=sst2,cb", "model=tiny-bert", "logger=none", "trainer.max_epochs=1",
            "trainer.accelerator=cpu", "task.num_train=16", "task.num_dev=8", "task.num_test=8",
            "task.max_length=64", "save_checkpoint=false", f"data_dir={data_dir}", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert len(records) == 4
    assert all(r["status"] == "completed" for r in records)
    assert sorted((r["method"], r["task"]) for r in records) == sorted(product(["full", "bitfit"], ["sst2", "cb"]))
    assert len({r["config"]["paths"]["output_dir"] for r in records}) == 4  # one folder per job
    for r in records:
        main = "test/acc"
        assert r["main_metric"] == main and main in r["metrics"]
        assert r["data"]["sizes"]["train"] == 16


# --------------------------------------------------------------------------- loggers
def test_csv_logger(tmp_path, data_dir):
    overrides = [*CLI_TINY, "method=bitfit", "logger=csv", "save_checkpoint=false", f"data_dir={data_dir}"]
    record = run_in_process(overrides, tmp_path)
    assert record["status"] == "completed"
    files = list((tmp_path / "csv").rglob("metrics.csv"))
    assert len(files) == 1
    with open(files[0]) as handle:
        rows = list(csv.DictReader(handle))
    assert "dev/acc" in rows[0]
    assert any(row.get("final/test/acc") for row in rows)


@pytest.mark.parametrize("how", ["logger.offline=false", "WANDB_MODE=online"])
def test_online_wandb_without_key_fails_clearly_before_contacting_it(how, tmp_path, data_dir, monkeypatch):
    from gem.train import run

    offline_env(monkeypatch)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    overrides = [*CLI_TINY, "method=bitfit", "logger=wandb", f"data_dir={data_dir}"]
    if how.startswith("WANDB_MODE"):
        monkeypatch.setenv("WANDB_MODE", "online")
    else:
        overrides.append(how)
    out = tmp_path / "run"
    cfg = compose(overrides, out)
    with pytest.raises(RuntimeError, match="WANDB_API_KEY"):
        run(cfg)
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "failed"
    assert "WANDB_API_KEY" in record["error"] and "wandb login" in record["error"]
    assert "fit" not in record["time_s"]  # it failed before training (and before wandb.init)
    assert not (out / "wandb").exists()


# --------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize("group,value", [("method", "no_such_method"), ("task", "no_such_task")])
def test_unknown_group_option_is_a_hydra_error(group, value, tmp_path):
    proc = run_cli([f"{group}={value}", "model=tiny-bert", "logger=none"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert f"Could not find '{group}/{value}'" in proc.stderr
    assert f"Available options in '{group}'" in proc.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_offline_without_data_dir_is_a_fast_data_error(tmp_path, monkeypatch):
    from gem.data import DataError
    from gem.train import run

    offline_env(monkeypatch)  # HF_HUB_OFFLINE=1, GEM_DATA_DIR unset
    out = tmp_path / "run"
    cfg = compose([*CLI_TINY, "method=gem", "logger=none"], out)
    assert cfg.data_dir is None
    start = time.perf_counter()
    with pytest.raises(DataError, match="data_dir"):
        run(cfg)
    assert time.perf_counter() - start < 15
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "failed" and "data_dir" in record["error"]


# --------------------------------------------------------------------------- evaluation order
class TestPredictions(Callback):
    """Each test example's prediction, keyed by its unpadded tokens (batches hold no example ids)."""

    __test__ = False  # a Lightning callback, not a pytest test class

    def __init__(self):
        self.predictions: list[tuple] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with torch.no_grad():
            predicted = pl_module(batch).logits.argmax(-1)
        for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], predicted):
            self.predictions.append((tuple(ids[mask.bool()].tolist()), int(label)))


def test_eval_order_does_not_change_predictions_or_metrics(tmp_path, data_dir):
    # Longest-first batches pad differently and come in another order; every example's
    # prediction, and so every metric, must stay the same. (Decoders: tests/test_decoder.py.)
    # MiniLM with its random head kept (LR ~ 0) predicts both classes; the tiny random model
    # predicts one class for all, which would hide a prediction that moved to another example
    common = [*TINY_RUN, "method=bitfit", "task=rte", "model=minilm", "optim.lr=1e-9", f"data_dir={data_dir}", "eval_batch_size=5"]
    probes = {order: TestPredictions() for order in ("dataset", "length")}
    runs = {order: run_in_process([*common, f"eval_order={order}"], tmp_path / order, extra_callbacks=[probes[order]])
            for order in probes}
    for key in ("dev/acc", "test/acc"):
        assert runs["length"]["metrics"][key] == runs["dataset"]["metrics"][key]
    dataset, length = probes["dataset"].predictions, probes["length"].predictions
    assert len(dataset) == 16 and length != dataset                 # same examples, another order
    assert sorted(length) == sorted(dataset)
    assert len({label for _, label in dataset}) > 1                 # not a constant predictor
