"""The notebooks run top to bottom (nbclient, kernel `python3`) on data the tests write.

`tables_and_figures.ipynb` gets a folder of small, schema-valid fake records (and an empty
folder); `gem_allocations.ipynb` gets a hand-written allocation.csv, and (slow) a real tiny
GEM run. The parameter cell (tagged `parameters`) is replaced by the test's values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from gem.tables import build_table, load_records, render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SHARED_DATA = Path(os.environ.get("GEM_DATA_DIR") or ROOT.parent / "shared" / "data")


@pytest.fixture(autouse=True)
def this_environments_kernel(monkeypatch):
    """Kernel `python3` from this interpreter's environment first (a user-wide `python3` kernel
    spec of another Python would otherwise win); jupyter_client runs it with sys.executable."""
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        p for p in (str(Path(sys.prefix) / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p))


def execute(name: str, **parameters) -> tuple[object, str]:
    """Run a notebook with its parameter cell replaced; returns the notebook and all its text output."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    defaults = cells[0].source
    for key in parameters:
        assert f"{key} =" in defaults, f"{name} has no parameter {key}"
    # like papermill: the defaults stay, the test's values come after them
    cells[0].source = defaults + "\n# injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    text = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text.append(output.get("text", ""))
            elif output.get("output_type") in ("execute_result", "display_data"):
                data = output.get("data", {})
                text.append(data.get("text/markdown", "") or data.get("text/plain", ""))
            elif output.get("output_type") == "error":
                text.append("ERROR " + output.get("ename", ""))
    return nb, "\n".join(text)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _record(root: Path, method: str, task: str, seed: int, value: float, *, lr: float = 1e-3,
            density: float = 0.001, status: str = "completed") -> None:
    """A small results.json with the schema of gem/records.py (no training)."""
    folder = root / f"{task}_{method}_lr{lr}_d{density}_s{seed}_{status}"
    folder.mkdir(parents=True)
    record = {
        "record_version": 1, "status": status, "method": method, "task": task, "model": "tiny-bert", "seed": seed,
        "metrics": {"dev/acc": value, "test/acc": value} if status == "completed" else {},
        "main_metric": "test/acc",
        "params": {"total": 1_011_426, "trainable": 1075, "tuned": 1009 if method == "gem" else 1_011_426,
                   "head": 66, "tuned_pct": 0.0998 if method == "gem" else 100.0},
        "config": {"seed": seed, "optim": {"lr": lr}, "model": {"name": "tiny-bert"},
                   "task": {"name": task, "metrics": ["acc"]},
                   "method": {"name": method, "lr": lr, "density": density}},
    }
    if method == "gem":
        record["gem"] = {"budget": 1011, "tuned": 1009, "changed_outside_mask": 0, "budgets": {
            f"bert.encoder.layer.{i}.attention.self.{k}": b
            for i, (q, v) in enumerate([(1 + seed, 640), (2, 360 - seed)]) for k, b in (("query", q), ("value", v))}}
    (folder / "results.json").write_text(json.dumps(record))


@pytest.fixture
def fake_results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for task, base in (("rte", 0.6), ("sst2", 0.8)):
        for seed in (1, 2):
            _record(root, "full", task, seed, base + 0.01 * seed)
            _record(root, "lora", task, seed, base - 0.02 + 0.01 * seed)
            for lr, shift in ((1e-3, 0.03), (1e-4, 0.0)):
                _record(root, "gem", task, seed, base + shift + 0.01 * seed, lr=lr)
            _record(root / "density", "gem", task, seed, base + 0.05, density=0.01)
    _record(root, "gem", "rte", 9, 0.0, status="failed")
    return root


def test_tables_notebook_on_fake_records(fake_results, tmp_path):
    out = tmp_path / "generated"
    nb, text = execute("tables_and_figures.ipynb", ABLATION_DIRS=[], RESULTS_DIR=str(fake_results), OUTPUT_DIR=str(out),
                       SELECT_BY="dev", SWEEP_KEYS=["config.optim.lr", "config.method.density"], METRIC=None)
    assert "ERROR" not in text
    assert "| GEM | 0.0998 |" in text and "left out: 1 failed" in text
    assert "\\begin{tabular}" in text
    # the notebook's table is the command's table, byte for byte
    expected = render(build_table(load_records([fake_results]), select_by="dev",
                                  sweep_keys=["config.optim.lr", "config.method.density"]), "md")
    assert (out / "table.md").read_text(encoding="utf-8") == expected
    assert {p.name for p in out.iterdir()} == {"table.md", "table.tex", "table.csv", "budgets.png", "density.png"}
    assert _images(nb) == 2


def test_tables_notebook_without_records(tmp_path):
    empty = tmp_path / "results"
    empty.mkdir()
    nb, text = execute("tables_and_figures.ipynb", ABLATION_DIRS=[], RESULTS_DIR=str(empty), OUTPUT_DIR=None)
    assert "No run records under" in text and "ERROR" not in text
    _, text = execute("tables_and_figures.ipynb", ABLATION_DIRS=[], RESULTS_DIR=str(tmp_path / "missing"), OUTPUT_DIR=None)
    assert "No run records under" in text


ALLOCATION = """name,numel,selectable,budget,density,r_norm,entropy,allocation_score
bert.encoder.layer.0.attention.self.query,1024,1024,1,0.0009765625,0.0029,4.69,0.0138
bert.encoder.layer.0.attention.self.value,1024,1024,649,0.6337890625,1.3303,4.33,5.7609
bert.encoder.layer.1.attention.self.query,1024,1024,1,0.0009765625,0.0032,4.50,0.0145
bert.encoder.layer.1.attention.self.value,1024,1024,358,0.349609375,0.6333,5.03,3.1826
"""


def test_allocation_notebook_on_written_csv(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "allocation.csv").write_text(ALLOCATION)
    (run / "results.json").write_text(json.dumps({
        "status": "completed", "method": "gem", "task": "rte", "model": "tiny-bert", "seed": 1,
        "metrics": {"test/acc": 0.5}, "params": {"tuned_pct": 0.0998},
        "gem": {"budget": 1011, "tuned": 1009, "changed_outside_mask": 0, "budgets": {
            "bert.encoder.layer.0.attention.self.query": 1, "bert.encoder.layer.0.attention.self.value": 649,
            "bert.encoder.layer.1.attention.self.query": 1, "bert.encoder.layer.1.attention.self.value": 358}}}))
    nb, text = execute("gem_allocations.ipynb", RUN_DIR=str(run), SEARCH_DIR=str(tmp_path))
    assert "ERROR" not in text
    assert "4 matrices, total budget 1009" in text
    assert "allocation.csv budgets match the record: True" in text
    assert _images(nb) == 2
    # RUN_DIR None: the newest allocation.csv under SEARCH_DIR; nothing there: a message, no error
    _, text = execute("gem_allocations.ipynb", RUN_DIR=None, SEARCH_DIR=str(tmp_path))
    assert "4 matrices" in text
    _, text = execute("gem_allocations.ipynb", RUN_DIR=None, SEARCH_DIR=str(tmp_path / "nothing"))
    assert "No allocation.csv found" in text and "ERROR" not in text


@pytest.mark.slow
def test_notebooks_on_a_real_tiny_gem_run(tmp_path):
    """A real (tiny, offline) GEM run: its allocation.csv and results.json feed both notebooks."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data folder {SHARED_DATA} is absent")
    run = tmp_path / "results" / "gem_rte"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "run.py", "method=gem", "model=tiny-bert", "task=rte", f"data_dir={SHARED_DATA}",
                    "task.num_train=32", "task.num_dev=16", "task.num_test=16", "task.max_length=64",
                    "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none", "method.num_grad_samples=16",
                    "save_checkpoint=false", f"hydra.run.dir={run}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    nb, text = execute("gem_allocations.ipynb", RUN_DIR=str(run), SEARCH_DIR=str(tmp_path))
    assert "ERROR" not in text and "allocation.csv budgets match the record: True" in text
    nb, text = execute("tables_and_figures.ipynb", ABLATION_DIRS=[], RESULTS_DIR=str(tmp_path / "results"), OUTPUT_DIR=None)
    assert "| GEM |" in text and _images(nb) == 1


def test_tables_notebook_reads_ablation_folders_for_the_density_figure(tmp_path):
    main_runs, ablations = tmp_path / "runs", tmp_path / "ablations"
    for seed in (1, 2):
        _record(main_runs, "gem", "rte", seed, 0.6 + 0.01 * seed)                    # the table's density
        _record(ablations, "gem", "rte", seed, 0.65 + 0.01 * seed, density=0.01)     # the sweep
    nb, text = execute("tables_and_figures.ipynb", RESULTS_DIR=str(main_runs), ABLATION_DIRS=[str(ablations)],
                       OUTPUT_DIR=None)
    assert "ERROR" not in text and "No density sweep" not in text
    assert "2 records under" in text  # the table reads only RESULTS_DIR
    assert _images(nb) == 2           # budgets and density
