"""Export: a finished run's checkpoint rebuilt on a fresh base model and folded into a plain HF model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from gem.export import export_run, load_trained
from gem.methods import MethodError
from tests.conftest import TINY_RUN, method_overrides, run_in_process


@pytest.mark.parametrize("method", ["gem"])  # every method's merge and save_pretrained: tests/test_contract.py
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


def test_export_cli_errors_name_the_problem(data_dir, tmp_path, capsys):
    from gem.export import main

    run_dir = tmp_path / "run"
    run_in_process([*TINY_RUN, "method=bitfit", f"data_dir={data_dir}"], run_dir)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main([str(run_dir), "--output", str(taken)])
    assert "is not empty (another export?)" in capsys.readouterr().err
    assert (taken / "config.json").read_text() == "{}"
    (run_dir / "results.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main([str(run_dir), "--output", str(tmp_path / "new")])
    assert f"{run_dir / 'results.json'}: cannot read the run record" in capsys.readouterr().err
