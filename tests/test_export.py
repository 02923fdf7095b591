"""Export: a finished run's checkpoint rebuilt on a fresh base model and folded into a plain HF model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from gem.export import export_run, load_trained
from gem.methods import MethodError
from tests.conftest import TINY_RUN, method_overrides, run_in_process


@pytest.mark.parametrize("method", ["gem", "lora"])
def test_merged_export_reproduces_the_trained_model(method, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    record = run_in_process([*TINY_RUN, *method_overrides(method), f"data_dir={data_dir}"], run_dir)
    assert record["status"] == "completed"
    trained, tokenizer, _, _ = load_trained(run_dir)
    export_run(run_dir, tmp_path / "hf")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    batch = tokenizer(["a short sentence", "and a second, longer one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = trained.eval()(**batch).logits
        assert torch.allclose(plain(**batch).logits, expected, atol=1e-5)
    if method == "gem":  # W0 + delta is computed the same way in training and in the merge: bit-equal
        assert torch.equal(plain(**batch).logits, expected)


def test_adapters_refuse_to_merge(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_in_process([*TINY_RUN, *method_overrides("adapter"), f"data_dir={data_dir}"], run_dir)
    with pytest.raises(MethodError, match="cannot be folded"):
        export_run(run_dir, tmp_path / "hf")
