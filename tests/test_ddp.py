"""DDP on the CPU (2 processes, gloo): the same masks on both ranks and as in one process; one record."""

from __future__ import annotations

import json

import torch
from gem.tuner import read_adapter_entries

from conftest import TINY_RUN, run_cli

# 40 gradient-pass examples in batches of 16: 16 + 16 + 8, a short last batch, so the DDP sum
# matches one process only if the ranks split the single-process batches (not the examples).
ARGS = [*TINY_RUN, "method=gem", "method.num_grad_samples=40", "task.num_train=40", "batch_size=16"]


def test_ddp_cpu_masks_match_single_process_and_one_record(data_dir, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert run_cli([*ARGS, f"data_dir={data_dir}", f"hydra.run.dir={single}"], cwd=tmp_path).returncode == 0
    result = run_cli([*ARGS, f"data_dir={data_dir}", f"hydra.run.dir={ddp}", "trainer=ddp_cpu",
                      "trainer.accelerator=cpu"], cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]

    records = list(ddp.rglob("results.json"))
    assert records == [ddp / "results.json"]  # written once, by rank 0
    record = json.loads(records[0].read_text())
    assert record["status"] == "completed"
    # Both ranks' masks were compared at selection time (all_gather of per-matrix checksums).
    assert record["gem"]["ranks_with_identical_masks"] == 2
    # The ranks summed disjoint batches of the 40 gradient-pass examples; the all-reduce covers all once.
    assert record["gem"]["gradient_samples"] == 40
    assert record["gem"]["changed_outside_mask"] == 0

    # The same masks as one process on the same data (scores agree up to summation order).
    one, two = read_adapter_entries(single / "checkpoint"), read_adapter_entries(ddp / "checkpoint")
    assert list(one) == list(two) and all(torch.equal(one[n][0], two[n][0]) for n in one)
    assert json.loads((single / "checkpoint" / "adapter_config.json").read_text())["budgets"] == \
        json.loads((ddp / "checkpoint" / "adapter_config.json").read_text())["budgets"]
