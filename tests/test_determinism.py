"""The same seed gives the same run; another seed gives other samples and another mask.

Three in-process GEM runs of the tiny BERT on a tiny RTE subset (seed 1 twice, seed 2 once),
each saving its checkpoint: metrics, the masks (the saved delta's indices), the trained
values and the records must agree between the two seed-1 runs, except for wall-clock times,
time stamps and the run folder's own path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_RUN, run_in_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# Fields that measure wall-clock time or say when; everything else must repeat exactly.
_TIMING = {"time_s", "started_at", "finished_at", "gradient_pass_s", "selection_math_s"}


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in _TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def comparable(record: dict, run_dir: Path) -> dict:
    """The record with timing fields dropped and its own run folder replaced by a placeholder."""
    text = json.dumps(record, sort_keys=True).replace(str(run_dir), "<run dir>")
    return _without_timing(json.loads(text))


@pytest.fixture(scope="module")
def gem_runs(tmp_path_factory, data_dir):
    """{name: (record, run_dir, train uids)} for seed 1 (twice) and seed 2."""
    import gem.train

    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path_factory.mktemp(f"determinism_{name}")
        seen = []

        def load_task(*args, _load=gem.train.load_task, **kwargs):
            task = _load(*args, **kwargs)
            seen.append([ex["uid"] for ex in task.train])
            return task

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gem.train, "load_task", load_task)
            record = run_in_process([*TINY_RUN, "method=gem", "method.num_grad_samples=16", f"seed={seed}",
                                     "save_checkpoint=true", f"data_dir={data_dir}"], out)
        assert record["status"] == "completed"
        runs[name] = (record, out, seen[0])
    return runs


def saved_delta(run_dir: Path):
    from gem.tuner import read_adapter_entries

    return read_adapter_entries(run_dir / "checkpoint")


def adapter_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoint" / "adapter_config.json").read_text())


def test_same_seed_same_metrics_and_history(gem_runs):
    (a, _, train_a), (b, _, train_b) = gem_runs["a"], gem_runs["b"]
    assert train_a == train_b
    assert a["metrics"] == b["metrics"] and a["metrics"]
    assert a["history"] == b["history"]
    assert a["params"] == b["params"]


def test_same_seed_same_mask_and_values(gem_runs):
    import torch

    delta_a, delta_b = saved_delta(gem_runs["a"][1]), saved_delta(gem_runs["b"][1])
    assert list(delta_a) == list(delta_b) and sum(i.numel() for i, _ in delta_a.values()) > 0
    for name in delta_a:
        assert torch.equal(delta_a[name][0], delta_b[name][0]), name
        assert torch.equal(delta_a[name][1], delta_b[name][1]), name
    assert adapter_config(gem_runs["a"][1])["base_fingerprint"] == adapter_config(gem_runs["b"][1])["base_fingerprint"]
    assert (gem_runs["a"][1] / "allocation.csv").read_text() == (gem_runs["b"][1] / "allocation.csv").read_text()


def test_same_seed_same_record_modulo_timing(gem_runs):
    (a, dir_a, _), (b, dir_b, _) = gem_runs["a"], gem_runs["b"]
    assert set(a) == set(b)
    assert comparable(a, dir_a) == comparable(b, dir_b)
    on_disk = json.loads((dir_a / "results.json").read_text())
    assert comparable(on_disk, dir_a) == comparable(a, dir_a)


def test_different_seed_different_samples_and_mask(gem_runs):
    import torch

    (a, dir_a, train_a), (c, dir_c, train_c) = gem_runs["a"], gem_runs["c"]
    assert len(train_a) == len(train_c) == 32
    assert train_a != train_c and set(train_a) != set(train_c)
    delta_a, delta_c = saved_delta(dir_a), saved_delta(dir_c)
    # the same base model ...
    assert adapter_config(dir_a)["base_fingerprint"] == adapter_config(dir_c)["base_fingerprint"]
    assert any(n not in delta_c or not torch.equal(delta_a[n][0], delta_c[n][0])
               for n in delta_a)  # ... but another gradient pass, so another mask
    assert a["seed"] == 1 and c["seed"] == 2
