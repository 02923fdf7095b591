"""Smoke test of experiments/benchmark.py on the tiny random BERT: JSON keys and GEM's footprint."""

from __future__ import annotations

import json

import pytest

from experiments import benchmark

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TINY = json.dumps({"name": "tiny-bert", "pretrained": "tiny:bert", "kind": "encoder",
                   "target_modules": ["query", "value"]})
KEYS = {"step_time_s", "step_times_s", "peak_mem_bytes", "optimizer_state_numel", "optimizer_state_method_numel",
        "checkpoint_bytes", "tuned_entries", "head_entries", "trainable_entries"}


def test_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--model", TINY, "--methods", "full,lora,gem", "--steps", "2", "--warmup", "1",
                    "--mem-steps", "1", "--grad-batches", "1", "--batch-size", "4", "--seq-len", "32",
                    "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| gem |" in printed and "GEM vs LoRA" in printed

    data = json.loads(out.read_text())
    assert {"full", "lora", "gem", "_meta"} <= set(data)
    for name in ("full", "lora", "gem"):
        r = data[name]
        assert KEYS <= set(r), f"{name} lacks {KEYS - set(r)}"
        assert len(r["step_times_s"]) == 2 and r["step_time_s"] > 0
        assert r["peak_mem_bytes"] >= 0 and r["checkpoint_bytes"] > 0

    gem, full = data["gem"], data["full"]
    assert {"gradient_pass_s", "selection_math_s"} <= set(gem)
    tuned, head = gem["tuned_entries"], gem["head_entries"]
    assert 0 < tuned <= gem["total_budget"]
    # AdamW keeps two moments per tuned entry, nothing dense.
    assert gem["optimizer_state_method_numel"] == 2 * tuned
    step_counters = gem["optimizer_state_numel"] - 2 * (tuned + head)
    assert 0 < step_counters <= 64
    assert full["tuned_entries"] > 100 * tuned
    # The checkpoint holds the selected entries (+ head), not the dense model.
    assert gem["checkpoint_bytes"] < 0.05 * full["checkpoint_bytes"]
    assert gem["checkpoint_bytes"] < 16 * (tuned + head) + 64 * 1024


def test_backward_floor_row_trains_only_its_gate_and_the_head(capsys):
    results = benchmark.main(["--model", TINY, "--methods", "full,gem,backward_floor", "--steps", "1",
                              "--warmup", "1", "--grad-batches", "1", "--batch-size", "2", "--seq-len", "16",
                              "--threads", "1", "--no-memory"])
    printed = capsys.readouterr().out
    assert "backward_floor/full step time" in printed and "GEM/backward_floor step time" in printed
    floor = results["backward_floor"]
    assert floor["tuned_entries"] == 1  # the scalar gate on the embedding output
    assert floor["trainable_entries"] == 1 + floor["head_entries"]
    # The gate's gradient is the whole input-gradient backward: one moment pair per trained tensor.
    assert floor["optimizer_state_method_numel"] == 2


def test_backward_floor_gate_receives_gradient_through_every_layer():
    import torch

    state = benchmark.build(benchmark.parse_args(["--batch-size", "2", "--seq-len", "8"]),
                            json.loads(TINY), "backward_floor", torch.device("cpu"))
    model = state["model"]
    model(**state["batch"]).loss.backward()
    gate = model.get_input_embeddings().benchmark_gate
    assert gate.grad is not None and torch.isfinite(gate.grad) and gate.grad != 0
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
