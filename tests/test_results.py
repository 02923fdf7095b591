"""The committed table is exactly what the table command makes of the committed records."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"
TABLE_COMMAND = [sys.executable, "-m", "gem.tables", "results/runs", "--select-by", "dev"]


@pytest.mark.skipif(not (RESULTS / "table.md").exists(), reason="no committed table yet")
def test_table_command_reprints_the_committed_table_byte_for_byte():
    made = subprocess.run(TABLE_COMMAND, cwd=RESULTS.parent, capture_output=True, text=True, check=True)
    assert made.stdout == (RESULTS / "table.md").read_text()


SMOLLM2_TABLE_COMMAND = [sys.executable, "-m", "gem.tables", "results/smollm2", "--select-by", "dev"]


@pytest.mark.skipif(not (RESULTS / "table_smollm2.md").exists(), reason="no committed decoder table yet")
def test_decoder_table_command_reprints_the_committed_table_byte_for_byte():
    made = subprocess.run(SMOLLM2_TABLE_COMMAND, cwd=RESULTS.parent, capture_output=True, text=True, check=True)
    assert made.stdout == (RESULTS / "table_smollm2.md").read_text()


SIZES_TABLE_COMMAND = [sys.executable, "-m", "gem.tables", "results/smollm2", "results/gemma3", "--select-by", "dev",
                       "--tasks", "sst2,rte"]


@pytest.mark.skipif(not (RESULTS / "table_sizes.md").exists(), reason="no committed model-size table yet")
def test_model_size_table_command_reprints_the_committed_table_byte_for_byte():
    made = subprocess.run(SIZES_TABLE_COMMAND, cwd=RESULTS.parent, capture_output=True, text=True, check=True)
    assert made.stdout == (RESULTS / "table_sizes.md").read_text()


MANIFEST_COMMAND = [sys.executable, "-m", "gem.manifest", "results/runs", "results/ablations", "results/smollm2",
                    "results/gem_lm", "results/gemma3"]


@pytest.mark.skipif(not (RESULTS / "manifest.md").exists(), reason="no committed manifest yet")
def test_manifest_command_reprints_the_committed_manifest_byte_for_byte():
    made = subprocess.run(MANIFEST_COMMAND, cwd=RESULTS.parent, capture_output=True, text=True, check=True)
    assert made.stdout == (RESULTS / "manifest.md").read_text()
