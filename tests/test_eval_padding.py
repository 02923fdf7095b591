"""experiments/eval_padding.py on real data with the tiny LLaMA's (SmolLM2) tokenizer."""

from __future__ import annotations

import pytest

from experiments import eval_padding

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_length_order_computes_fewer_positions(data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    row = eval_padding.measure("tiny-llama", "rte", str(data_dir), seed=1, eval_batch_size=16)
    assert row["examples"] == 277 and row["eval_batch_size"] == 16
    # every position holds a real token or padding; longest-first batching pads less
    assert row["real"] <= row["length"] < row["dataset"]


def test_cli_prints_one_row_per_task(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    eval_padding.main(["--model", "tiny-llama", "--tasks", "cb,gsm8k", "--data-dir", str(data_dir)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cb") or line.startswith("| gsm8k")]
    assert len(rows) == 2 and all(float(r.rstrip(" |").rsplit("| ", 1)[1]) < 1 for r in rows)
