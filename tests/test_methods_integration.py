"""Every method end to end through Hydra + Lightning, checkpoint reloads, BitFit on MiniLM.

Each method runs once (one epoch of a 32-example RTE subset on the tiny BERT; see
conftest.method_runs) and the checkpoint tests reuse those runs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import ALL_METHODS, SPARSE, TINY_RUN, run_in_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_composes_and_runs(method, method_runs):
    record, run_dir, cfg, probe = method_runs(method)
    assert cfg.method.name == method
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["status"] == "completed", on_disk.get("error")
    assert on_disk["method"] == method and on_disk["task"] == "rte" and on_disk["model"] == "tiny-bert"
    metrics = on_disk["metrics"]
    for key in ("dev/acc", "test/acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert on_disk["main_metric"] == "test/acc"
    assert on_disk["data"]["sizes"] == {"train": 32, "dev": 16, "test": 16}
    params = on_disk["params"]
    assert params["total"] > 0 and 0 < params["tuned"] <= params["total"]
    assert params["tuned_pct"] == pytest.approx(100.0 * params["tuned"] / params["total"])
    assert params["head"] == 2 * 32 + 2  # tiny BERT (hidden 32) classifier for 2 labels
    assert on_disk["best_epoch"] == 0 and len(on_disk["history"]) == 1
    assert on_disk["time_s"]["total"] > 0
    assert (run_dir / "checkpoint" / "method_config.json").exists()
    # AdamW holds two moments for exactly the trainable entries, nothing frozen.
    assert sum(probe.state_numel.values()) == 2 * params["trainable"]
    assert params["trainable"] == params["tuned"] + params["head"]
    if method in SPARSE:
        assert on_disk["gem"]["changed_outside_mask"] == 0
        assert on_disk["gem"]["tuned"] == params["tuned"]
        assert (run_dir / "allocation.csv").exists()
    if method == "full":
        assert params["tuned"] == params["total"] - params["head"]


def _evaluate(model, cfg, data_dir, tokenizer) -> tuple[dict[str, float], torch.Tensor]:
    """Dev and test metrics (and the dev logits) of `model`, recomputed outside Lightning with
    the run's own sampled data and collator."""
    from gem.data import encoder_collator, load_task
    from gem.metrics import build_metrics

    task = load_task(cfg.task, str(data_dir), int(cfg.seed))
    collate = encoder_collator(tokenizer, task, int(cfg.task.max_length))
    results, dev_logits = {}, []
    model.eval()
    for split, examples in (("dev", task.dev), ("test", task.test)):
        metrics = build_metrics(list(task.metrics), task.kind, task.num_labels).clone(prefix=f"{split}/")
        with torch.no_grad():
            for batch in DataLoader(examples, batch_size=int(cfg.eval_batch_size), collate_fn=collate):
                logits = model(**batch).logits
                metrics.update(logits.argmax(dim=-1), batch["labels"])
                if split == "dev":
                    dev_logits.append(logits)
        results.update({k: float(v) for k, v in metrics.compute().items()})
    return results, torch.cat(dev_logits)


@pytest.mark.parametrize("method", ["full", "bitfit", "lora", "adapter", "gem"])
def test_checkpoint_reload_reproduces_dev_metric(method, method_runs, data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gem.methods import build_method
    from gem.models import load_model
    from gem.methods import method_options

    record, run_dir, cfg, _ = method_runs(method)
    assert record["status"] == "completed"
    torch.manual_seed(12345)  # a head initialised differently from the run's: the checkpoint must overwrite it
    loaded = load_model(cfg.model, "classification", 2)
    targets = list(cfg.method.get("target_modules") or cfg.model.target_modules)  # as gem.train does
    fresh = build_method(cfg.method.name, targets, **method_options(cfg.method))
    model = fresh.prepare(loaded.model, loaded.head_parameter_names)
    if method == "gem":
        # No gradient pass, no select(): the saved adapter alone defines the mask.
        from gem.tuner import gem_modules

        assert not fresh.selected and not list(gem_modules(model))
    _, untrained_logits = _evaluate(model, cfg, data_dir, loaded.tokenizer)
    model = fresh.load(model, run_dir / "checkpoint")
    if method == "gem":
        assert fresh.tuned_count(model) == record["params"]["tuned"]
        assert sum(fresh.budgets.values()) == record["params"]["tuned"]
    results, logits = _evaluate(model, cfg, data_dir, loaded.tokenizer)
    assert not torch.equal(logits, untrained_logits), "loading the checkpoint changed nothing"
    assert results["dev/acc"] == record["metrics"]["dev/acc"]
    assert results["test/acc"] == record["metrics"]["test/acc"]


def test_bitfit_checkpoint_holds_only_biases_and_head(method_runs):
    from safetensors.torch import load_file

    record, run_dir, cfg, _ = method_runs("bitfit")
    saved = load_file(str(run_dir / "checkpoint" / "trained.safetensors"))
    assert any(n.startswith("classifier.") for n in saved)
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in saved)


def test_bitfit_minilm_tunes_under_half_a_percent(data_dir, tmp_path):
    overrides = [o for o in TINY_RUN if not o.startswith(("model=", "task.num_", "task.max_length"))]
    overrides += ["model=minilm", "method=bitfit", "task.num_train=16", "task.num_dev=8", "task.num_test=8",
                  "task.max_length=48", f"data_dir={data_dir}", "save_checkpoint=false"]
    record = run_in_process(overrides, tmp_path)
    assert record["status"] == "completed"
    params = record["params"]
    assert params["total"] > 20_000_000  # the real MiniLM (22.7M), not a tiny stand-in
    assert 0 < params["tuned_pct"] < 0.5
    assert math.isfinite(record["metrics"]["dev/acc"])
