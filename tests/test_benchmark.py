"""Smoke test of experiments/benchmark.py on the tiny random BERT: JSON keys and GEM's footprint."""

from __future__ import annotations

import json

import pytest
import torch

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
    state = benchmark.build(benchmark.parse_args(["--batch-size", "2", "--seq-len", "8"]),
                            json.loads(TINY), "backward_floor", torch.device("cpu"))
    model = state["model"]
    model(**state["batches"][0]).loss.backward()
    gate = model.get_input_embeddings().benchmark_gate
    assert gate.grad is not None and torch.isfinite(gate.grad) and gate.grad != 0
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


def test_random_init_needs_only_config_and_tokenizer(tmp_path, capsys):
    # A folder with config.json and the tokenizer but no weights, as for a model not at hand:
    # `--init random` builds the architecture, seeded, and every method (the memory children too)
    # trains the same random weights with a new head.
    from transformers import AutoConfig

    from gem.models.loading import load_tokenizer
    from gem.models.packaged import resolve_model_source

    source, _ = resolve_model_source({"pretrained": "tiny:bert"})
    folder = tmp_path / "config_only"
    AutoConfig.from_pretrained(source).save_pretrained(folder)
    load_tokenizer({"pretrained": "tiny:bert"}).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    spec = json.dumps({"name": "tiny-arch", "pretrained": str(folder), "kind": "encoder",
                       "target_modules": ["query", "value"]})
    common = ["--model", spec, "--methods", "full,gem", "--steps", "1", "--warmup", "0", "--mem-steps", "1",
              "--grad-batches", "1", "--batch-size", "2", "--seq-len", "16", "--threads", "1"]
    with pytest.raises(Exception, match="(?i)weights|no file named|safetensors"):
        benchmark.main(common + ["--no-memory"])  # the default (pretrained) needs the weights

    first = benchmark.main(common + ["--init", "random", "--json", str(tmp_path / "a.json")])
    again = benchmark.main(common + ["--init", "random", "--no-memory"])
    assert "tiny-arch (random init)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["_meta"]["init"] == "random"
    assert first["full"]["tuned_entries"] > 100 * first["gem"]["tuned_entries"] > 0
    assert first["gem"]["peak_mem_bytes"] >= 0  # the memory child loaded the parent's random weights
    assert first["gem"]["total_budget"] == again["gem"]["total_budget"]
    assert first["gem"]["checkpoint_bytes"] == again["gem"]["checkpoint_bytes"]


def test_task_batches_are_the_real_padded_training_batches(tmp_path, data_dir, capsys):
    # --task times the batches run.py would train on: real SST-2 sentences, padded per batch,
    # the same sequence for every method; the synthetic default is full length.
    out = tmp_path / "task.json"
    benchmark.main(["--model", TINY, "--methods", "full,gem", "--steps", "3", "--warmup", "1", "--mem-steps", "1",
                    "--grad-batches", "1", "--batch-size", "4", "--threads", "1", "--task", "sst2",
                    "--data-dir", str(data_dir), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "x sst2 training batches (padded to" in printed
    meta = json.loads(out.read_text())["_meta"]
    assert meta["task"] == "sst2" and meta["seq_len"] is None
    lengths = meta["timed_batch_lengths"]
    assert len(lengths) == 3 and all(3 <= n <= 128 for n in lengths) and max(lengths) < 128

    args = benchmark.parse_args(["--model", TINY, "--batch-size", "4", "--task", "sst2", "--data-dir", str(data_dir),
                                 "--steps", "3", "--warmup", "1"])
    from gem.models.loading import load_tokenizer

    tokenizer = load_tokenizer(benchmark.model_config(TINY))
    timed = benchmark.timed_batches(args, tokenizer, "encoder")
    again = benchmark.timed_batches(args, tokenizer, "encoder")
    grads = benchmark.gradient_batches(args, tokenizer, "encoder")
    assert [b["input_ids"].shape[1] for b in timed][1:] == lengths
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(timed, again))  # seeded
    assert set(timed[0]) >= {"input_ids", "attention_mask", "labels"} and timed[0]["labels"].shape == (4,)
    assert not any(torch.equal(g["input_ids"], t["input_ids"]) for g in grads for t in timed
                   if g["input_ids"].shape == t["input_ids"].shape)  # the gradient pass sees other batches


TINY_DECODER = json.dumps({"name": "tiny-llama", "pretrained": "tiny:llama", "kind": "decoder",
                           "target_modules": ["q_proj", "v_proj"]})


@pytest.mark.parametrize("model, task, message", [
    (TINY, "sst3", r"--task 'sst3': no conf/task/sst3.yaml; tasks: .*sst2"),
    (TINY, "stsb", r"--task 'stsb' is a regression task; --task supports classification tasks"),
    (TINY_DECODER, "sst2", r"--task times encoder models; for a decoder use synthetic batches"),
])
def test_task_errors_say_what_to_use(model, task, message, data_dir):
    with pytest.raises(SystemExit, match=message):
        benchmark.main(["--model", model, "--methods", "gem", "--steps", "1", "--warmup", "0", "--no-memory",
                        "--batch-size", "2", "--threads", "1", "--data-dir", str(data_dir), "--task", task])


def test_dispatch_preset_reports_host_overhead_per_module(tmp_path, capsys):
    out = tmp_path / "dispatch.json"
    benchmark.main(["--preset", "dispatch", "--steps", "3", "--warmup", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    meta = data["_meta"]
    assert meta["threads"] == 1 and meta["batch_size"] == 2 and meta["seq_len"] == 16
    assert set(data) - {"_meta"} == {"gem", "full", "lora", "backward_floor"}
    dispatch = meta["dispatch"]
    assert dispatch["target_modules"] == 32 and dispatch["gem_matrices_with_entries"] == 32  # every q/v has entries
    assert set(dispatch["host_overhead_us_per_module"]) == {"gem", "lora"}
    assert "host overhead per q/v module" in capsys.readouterr().out
