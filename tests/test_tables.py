"""The table command (gem.tables) and the figures (gem.figures) on small fake records.

The records are written here with the schema of `results.json` (see gem/records.py): no
training runs. The wandb path uses a mocked `wandb.Api`: the wandb server cannot be reached
from the test machines, so only the conversion of runs into records is tested.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from gem import tables
from gem.tables import build_table, load_records, load_wandb_records, main, records_to_frame, render

TUNED = {"full": 100.0, "lora": 0.24, "bitfit": 0.08, "gem": 0.0998, "gem_uniform": 0.0998}
MAIN = {"rte": "acc", "sst2": "acc", "cola": "mcc"}


def write_record(root: Path, *, method: str = "gem", task: str = "rte", model: str = "tiny-bert", seed: int = 1,
                 test: float | None = 0.5, dev: float | None = 0.5, lr: float = 1e-3, density: float = 0.001,
                 status: str = "completed", name: str | None = None) -> Path:
    """One schema-valid results.json in its own run folder; returns the record's path."""
    main = MAIN.get(task, "acc")
    metrics = {}
    if dev is not None:
        metrics[f"dev/{main}"] = dev
    if test is not None and status == "completed":
        metrics[f"test/{main}"] = test
    record = {
        "record_version": 1, "status": status, "method": method, "task": task, "model": model, "seed": seed,
        "metrics": metrics,
        "params": {"total": 1_000_000, "trainable": 1000, "tuned": int(TUNED.get(method, 1.0) * 1e4),
                   "head": 66, "tuned_pct": TUNED.get(method, 1.0)},
        "config": {"seed": seed, "model": {"name": model}, "task": {"name": task, "metrics": [main]},
                   "method": {"name": method, "lr": lr, "density": density}, "optim": {"lr": lr}},
    }
    if status == "completed":
        record["main_metric"] = f"test/{main}"
    if method.startswith("gem"):
        record["gem"] = {"budget": 1000, "changed_outside_mask": 0, "budgets": {
            f"bert.encoder.layer.{i}.attention.self.{kind}": 100 * (i + 1) + (50 if kind == "value" else 0)
            for i in range(2) for kind in ("query", "value")}}
    folder = root / (name or f"{model}_{task}_{method}_lr{lr}_d{density}_s{seed}_{status}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps(record, indent=2))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """3 methods x 2 tasks, 3 seeds each, plus one failed and one running run."""
    root = tmp_path / "runs"
    scores = {("full", "rte"): [0.70, 0.72, 0.74], ("full", "sst2"): [0.90, 0.91, 0.92],
              ("lora", "rte"): [0.60, 0.62, 0.64], ("lora", "sst2"): [0.93, 0.93, 0.93],
              ("gem", "rte"): [0.75, 0.76, 0.77], ("gem", "sst2"): [0.88, 0.90, 0.92]}
    for (method, task), values in scores.items():
        for seed, value in enumerate(values, start=1):
            write_record(root, method=method, task=task, seed=seed, test=value, dev=value)
    write_record(root, method="gem", task="rte", seed=4, status="failed", dev=None)
    write_record(root, method="lora", task="sst2", seed=4, status="running", dev=None)
    return root


def test_grouping_mean_std_and_seed_counts(runs):
    table = build_table(load_records([runs]))
    assert table.tasks == ["sst2", "rte"]                       # GLUE order, not alphabetical
    assert [r.method for r in table.rows] == ["full", "lora", "gem"]
    gem = table.rows[2]
    cell = gem.cells["rte"]
    assert cell.n == 3
    assert cell.mean == pytest.approx(76.0)
    assert cell.std == pytest.approx(statistics.stdev([75.0, 76.0, 77.0]))
    assert gem.average == pytest.approx((76.0 + 90.0) / 2)
    assert gem.tuned_pct == pytest.approx(0.0998)
    text = render(table, "md")
    assert "| GEM | 0.0998 | 90.0 ± 2.0 (3) | **76.0 ± 1.0 (3)** | **83.0** |" in text
    assert "| Full FT | 100 | 91.0 ± 1.0 (3) | 72.0 ± 2.0 (3) | 81.5 |" in text


def test_method_order_and_ablations_alphabetical(tmp_path):
    for method in ["random_mask", "gem", "bitfit", "gem_uniform", "full", "adapter", "lora", "fish"]:
        write_record(tmp_path, method=method)
    table = build_table(load_records([tmp_path]))
    assert [r.method for r in table.rows] == ["full", "lora", "adapter", "bitfit", "gem", "fish", "gem_uniform",
                                              "random_mask"]


def test_best_cell_is_bold_per_task_and_ties_all_bold(runs, tmp_path):
    table = build_table(load_records([runs]))
    md = render(table, "md")
    assert "**93.0 (3)**" not in md                           # std 0 with 3 seeds is printed
    assert "**93.0 ± 0.0 (3)**" in md                          # lora best on sst2
    assert "**76.0 ± 1.0 (3)**" in md                          # gem best on rte
    latex = render(table, "latex")
    assert r"\textbf{93.0 $\pm$ 0.0 (3)}" in latex
    assert r"\textbf{76.0 $\pm$ 1.0 (3)}" in latex
    tie = tmp_path / "tie"
    write_record(tie, method="full", test=0.5)
    write_record(tie, method="gem", test=0.5)
    tied = build_table(load_records([tie]))
    assert {(i, "rte") for i in range(2)} <= tied.best


def test_failed_and_running_runs_left_out_with_footer(runs):
    table = build_table(load_records([runs]))
    assert all(cell.n == 3 for row in table.rows for cell in row.cells.values())
    footer = [n for n in table.notes if n.startswith("left out:")]
    assert len(footer) == 1
    assert footer[0].startswith("left out: 1 failed, 1 running: ")
    assert "tiny-bert_rte_gem_lr0.001_d0.001_s4_failed/results.json" in footer[0]
    assert "tiny-bert_sst2_lora_lr0.001_d0.001_s4_running/results.json" in footer[0]
    assert "- left out: 1 failed, 1 running:" in render(table, "md")
    assert "% left out: 1 failed, 1 running:" in render(table, "latex")


def test_unreadable_record_is_counted(tmp_path):
    write_record(tmp_path, method="gem")
    broken = tmp_path / "broken" / "results.json"
    broken.parent.mkdir()
    broken.write_text('{"status": "compl')
    table = build_table(load_records([tmp_path]))
    assert table.rows[0].cells["rte"].n == 1
    assert "1 unreadable" in table.notes[0]


def test_latex_escaping():
    assert tables.latex_escape("gem_uniform 50% & $x#{y}~^\\") == (
        r"gem\_uniform 50\% \& \$x\#\{y\}\textasciitilde{}\textasciicircum{}\textbackslash{}")


def test_latex_render_escapes_names(tmp_path):
    write_record(tmp_path, method="gem_uniform", model="my_model")
    write_record(tmp_path, method="gem", model="other")
    latex = render(build_table(load_records([tmp_path]), group_by=["config.method.num_grad_samples"]), "latex")
    assert r"gem\_uniform" in latex and r"my\_model" in latex
    assert r"config.method.num\_grad\_samples" in latex
    assert r"Tuned \%" in latex
    assert "\\midrule\nother" in latex and "\\midrule\nmy\\_model" in latex    # a rule between models
    assert "gem_uniform" not in latex.replace("% ", "\n").split("\\begin{tabular}")[1].split("\\end{tabular}")[0]


def test_dev_selection_picks_lr_per_cell(tmp_path):
    # lr 1e-3: better dev, worse test; lr 1e-4: worse dev, better test -> the table reports 1e-3's test
    for seed in (1, 2):
        write_record(tmp_path, method="gem", lr=1e-3, seed=seed, dev=0.80, test=0.60 + 0.01 * seed)
        write_record(tmp_path, method="gem", lr=1e-4, seed=seed, dev=0.70, test=0.90)
        write_record(tmp_path, method="full", lr=1e-5, seed=seed, dev=0.60, test=0.50)
        write_record(tmp_path, method="full", lr=1e-6, seed=seed, dev=0.65, test=0.55)
    records = load_records([tmp_path])
    pooled = build_table(records)
    assert pooled.rows[1].cells["rte"].n == 4
    assert any(n.startswith("warning: 2 cell(s) pool runs with different config.optim.lr") for n in pooled.notes)
    chosen = build_table(records, select_by="dev")
    full, gem = chosen.rows
    assert gem.cells["rte"].selected == {"config.optim.lr": "0.001"}
    assert gem.cells["rte"].mean == pytest.approx(61.5) and gem.cells["rte"].n == 2
    assert gem.cells["rte"].candidates == 2
    assert full.cells["rte"].selected == {"config.optim.lr": "1e-06"}
    assert full.cells["rte"].mean == pytest.approx(55.0)
    assert "  tiny-bert/gem: rte=0.001" in chosen.notes
    assert not any(n.startswith("warning") for n in chosen.notes)
    csv_text = render(chosen, "csv")
    assert "tiny-bert,gem,rte,test/acc,61.5000,0.7071,2,1,0.0998,0.001" in csv_text
    # grouping by the LR instead shows every setting as its own row
    grouped = build_table(records, group_by=["lr"])
    assert [(r.method, r.group) for r in grouped.rows] == [
        ("full", ("1e-06",)), ("full", ("1e-05",)), ("gem", ("0.0001",)), ("gem", ("0.001",))]


def test_dev_selection_compares_settings_on_shared_seeds(tmp_path):
    # A two-stage grid: lr 1e-3 has seeds 1-3, lr 3e-3 only seed 1. Over all its seeds 1e-3 has
    # the higher dev mean (0.767 > 0.75), but on seed 1, the one both have, 3e-3 is better.
    for seed, dev in ((1, 0.70), (2, 0.80), (3, 0.80)):
        write_record(tmp_path, method="gem", lr=1e-3, seed=seed, dev=dev, test=0.60)
    write_record(tmp_path, method="gem", lr=3e-3, seed=1, dev=0.75, test=0.65)
    cell = build_table(load_records([tmp_path]), select_by="dev").rows[0].cells["rte"]
    assert cell.selected == {"config.optim.lr": "0.003"}
    assert cell.n == 1 and cell.mean == pytest.approx(65.0)
    # once 3e-3 has seeds 2-3 too, all three seeds decide
    for seed in (2, 3):
        write_record(tmp_path, method="gem", lr=3e-3, seed=seed, dev=0.70, test=0.65)
    cell = build_table(load_records([tmp_path]), select_by="dev").rows[0].cells["rte"]
    assert cell.selected == {"config.optim.lr": "0.001"} and cell.n == 3
    # a stray setting on a seed nobody else ran is compared on all seeds, with a warning
    write_record(tmp_path, method="gem", lr=1e-2, seed=4, dev=0.72, test=0.70)
    table = build_table(load_records([tmp_path]), select_by="dev")
    assert table.rows[0].cells["rte"].selected == {"config.optim.lr": "0.001"}
    assert "warning: 1 cell(s) have settings that share no seed, compared on all their seeds: tiny-bert/gem/rte" \
        in table.notes


def test_overrides_format_lists_each_cells_chosen_setting(tmp_path, capsys):
    write_record(tmp_path, method="gem", lr=1e-3, dev=0.70)
    write_record(tmp_path, method="gem", lr=3e-3, dev=0.75)
    write_record(tmp_path, method="full", lr=2e-5, dev=0.70)
    write_record(tmp_path, method="full", task="cb", lr=2e-5, dev=0.60)
    write_record(tmp_path, method="full", task="cb", lr=5e-5, dev=0.50)
    table = build_table(load_records([tmp_path]), select_by="dev")
    assert render(table, "overrides") == ("model=tiny-bert task=rte method=full optim.lr=2e-05\n"
                                          "model=tiny-bert task=cb method=full optim.lr=2e-05\n"
                                          "model=tiny-bert task=rte method=gem optim.lr=0.003\n")
    with pytest.raises(ValueError, match="add --select-by dev"):
        render(build_table(load_records([tmp_path])), "overrides")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--format", "overrides"])
    assert "add --select-by dev" in capsys.readouterr().err


def test_overrides_format_skips_a_cell_whose_chosen_runs_lack_the_key(tmp_path, capsys):
    # e.g. a calibration run made without the preset has no lr_index: `lr_index=none` would be
    # printed as a runnable line and fail in the next stage
    for lr_index, dev in ((0, 0.6), (1, 0.7)):
        path = write_record(tmp_path, method="full", lr=[2e-5, 5e-5][lr_index], dev=dev)
        record = json.loads(path.read_text())
        record["config"]["lr_index"] = lr_index
        path.write_text(json.dumps(record))
    write_record(tmp_path, method="gem", dev=0.9)                  # no config.lr_index
    table = build_table(load_records([tmp_path]), select_by="dev", sweep_keys=["config.lr_index"])
    assert render(table, "overrides") == "model=tiny-bert task=rte method=full lr_index=1\n"
    assert "skipped tiny-bert/rte/gem: its chosen runs do not record config.lr_index" in capsys.readouterr().err


def test_metric_override_and_missing_metric_footer(tmp_path):
    write_record(tmp_path, method="gem", task="rte", dev=0.8, test=0.6)
    write_record(tmp_path, method="gem", task="cola", dev=0.3, test=0.2)
    default = build_table(load_records([tmp_path]))
    assert default.main_metrics == {"cola": "test/mcc", "rte": "test/acc"}
    assert default.rows[0].cells["cola"].mean == pytest.approx(20.0)
    dev = build_table(load_records([tmp_path]), metric="dev/acc")
    assert list(dev.rows[0].cells) == ["rte"] and dev.rows[0].cells["rte"].mean == pytest.approx(80.0)
    assert any("1 completed without dev/acc" in n for n in dev.notes)
    assert "Metric: dev/acc, ×100" in render(dev, "md")
    dev_main = build_table(load_records([tmp_path]), metric="dev")
    assert dev_main.rows[0].cells["cola"].mean == pytest.approx(30.0)


def test_average_needs_every_task(tmp_path):
    write_record(tmp_path, method="gem", task="rte")
    write_record(tmp_path, method="gem", task="sst2")
    write_record(tmp_path, method="full", task="rte")
    table = build_table(load_records([tmp_path]))
    full, gem = table.rows
    assert full.average is None and gem.average == pytest.approx(50.0)
    assert "| Full FT | 100 | – | **50.0 (1)** | – |" in render(table, "md")   # tied: both bold


def test_repeated_seed_is_flagged(tmp_path):
    write_record(tmp_path, method="gem", seed=1, name="a")
    write_record(tmp_path, method="gem", seed=1, name="b")
    table = build_table(load_records([tmp_path, tmp_path / "a"]))     # overlapping roots: read once each
    assert table.rows[0].cells["rte"].n == 2
    assert any("count a seed more than once" in n for n in table.notes)


def test_render_is_deterministic_and_cli_reprints_byte_for_byte(runs, tmp_path, capsys):
    records = load_records([runs])
    for fmt in ("md", "latex", "csv"):
        first = render(build_table(records), fmt)
        again = render(build_table(list(reversed(records))), fmt)     # order of records does not matter
        assert first == again
        written = tmp_path / f"table.{fmt}"
        written.write_text(first, encoding="utf-8")
        assert tables.main([str(runs), "--format", fmt, "--output", str(tmp_path / f"cli.{fmt}")]) == 0
        assert (tmp_path / f"cli.{fmt}").read_bytes() == written.read_bytes()
        capsys.readouterr()
        assert tables.main([str(runs), "--format", fmt]) == 0
        assert capsys.readouterr().out == first


def test_cli_subprocess_matches(runs, tmp_path):
    expected = render(build_table(load_records([runs]), select_by="dev"), "latex")
    out = tmp_path / "t.tex"
    subprocess.run([sys.executable, "-m", "gem.tables", str(runs), "--select-by", "dev", "--format", "latex",
                    "--output", str(out)], check=True, capture_output=True)
    assert out.read_text(encoding="utf-8") == expected


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tables.main([])
    with pytest.raises(SystemExit):
        tables.main([str(tmp_path / "nope")])
    assert "no such record folder" in capsys.readouterr().err


def test_empty_folder_renders(tmp_path):
    text = render(build_table(load_records([tmp_path])), "md")
    assert "(no completed runs)" in text


def test_records_to_frame(runs):
    frame = records_to_frame(load_records([runs]))
    assert len(frame) == 20
    assert list(frame.columns[:7]) == ["_path", "status", "model", "task", "method", "seed", "main_metric"]
    assert {"config.optim.lr", "metrics.test/acc", "params.tuned_pct", "main_value"} <= set(frame.columns)
    done = frame[frame.status == "completed"]
    assert done.groupby("method").main_value.count().to_dict() == {"full": 6, "gem": 6, "lora": 6}


class FakeRun(SimpleNamespace):
    pass


def _wandb_runs():
    def run(run_id, state, method, seed, value, lr=1e-3, nested=True):
        config = ({"method": {"name": method, "lr": lr}, "task": {"name": "rte", "metrics": ["acc"]},
                   "model": {"name": "minilm"}, "seed": seed, "optim": {"lr": lr}} if nested else
                  {"params": {"tuned_pct": 0.1}, "optim.lr": {"value": lr, "desc": None}, "_wandb": {"x": 1}})
        summary = {"dev/acc": value, "test/acc": value, "dev/best_acc": 0.0, "train/loss": 0.3, "_step": 10,
                   "params/tuned_pct": TUNED[method]}
        return FakeRun(id=run_id, path=["ent", "gem", run_id], name=f"rte-{method}-minilm-s{seed}", state=state,
                       config=config, summary_metrics=summary)

    return [run("b2", "finished", "gem", 2, 0.72), run("a1", "finished", "gem", 1, 0.70),
            run("c3", "crashed", "gem", 3, 0.10), run("d4", "finished", "lora", 1, 0.65, nested=False),
            run("e5", "running", "lora", 2, 0.0)]


def test_wandb_runs_through_a_mocked_api(tmp_path, capsys):
    # The wandb server cannot be reached here: wandb.Api is mocked and only the conversion is tested.
    pytest.importorskip("wandb")
    api = mock.MagicMock()
    api.return_value.runs.return_value = _wandb_runs()
    with mock.patch("wandb.Api", api):
        records = load_wandb_records("ent/gem", {"config.task.name": "rte"})
        api.return_value.runs.assert_called_once_with("ent/gem", filters={"config.task.name": "rte"})
        assert [r["_path"] for r in records] == ["wandb:ent/gem/a1", "wandb:ent/gem/b2", "wandb:ent/gem/c3",
                                                  "wandb:ent/gem/d4", "wandb:ent/gem/e5"]
        lora = records[3]                                   # flat config, names from the run name
        assert (lora["method"], lora["task"], lora["model"], lora["seed"]) == ("lora", "rte", "minilm", 1)
        assert lora["config"]["optim"]["lr"] == 1e-3 and "_wandb" not in lora["config"]
        assert lora["metrics"] == {"dev/acc": 0.65, "test/acc": 0.65}
        table = build_table(records)
        assert [r.method for r in table.rows] == ["lora", "gem"]
        gem = table.rows[1].cells["rte"]
        assert gem.n == 2 and gem.mean == pytest.approx(71.0)
        assert table.notes[0] == "left out: 1 failed, 1 running: wandb:ent/gem/c3, wandb:ent/gem/e5"
        # the command line: local records and wandb runs in one table
        local = tmp_path / "local"
        write_record(local, method="full", model="minilm", test=0.6)
        assert tables.main([str(local), "--wandb-project", "ent/gem", "--wandb-filter",
                            '{"config.task.name": "rte"}']) == 0
        out = capsys.readouterr().out
        assert "| Full FT | 100 | 60.0 (1) | 60.0 |" in out and "| GEM | 0.0998 | **71.0 ± 1.4 (2)** |" in out


# ----------------------------------------------------------------------------- figures

def test_budget_rows_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from gem import figures

    for task in ("rte", "sst2"):
        for seed in (1, 2):
            write_record(tmp_path, method="gem", task=task, seed=seed)
    write_record(tmp_path, method="full", task="rte")
    rows = figures.budget_rows(load_records([tmp_path]))
    assert {(r["task"], r["kind"], r["layer"], r["budget"], r["runs"]) for r in rows} == {
        (t, k, layer, 100.0 * (layer + 1) + (50 if k == "v" else 0), 2)
        for t in ("rte", "sst2") for k in ("q", "v") for layer in (0, 1)}
    assert figures.matrix_layer_kind("model.decoder.layers.11.self_attn.q_proj") == (11, "q")
    assert figures.matrix_layer_kind("model.layers.3.self_attn.v_proj") == (3, "v")
    out = tmp_path / "figs" / "budgets.png"
    assert figures.main(["budgets", str(tmp_path), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budgets_fall_back_to_allocation_csv(tmp_path):
    from gem import figures

    path = write_record(tmp_path, method="gem")
    record = json.loads(path.read_text())
    del record["gem"]["budgets"]
    path.write_text(json.dumps(record))
    (path.parent / "allocation.csv").write_text(
        "name,numel,selectable,budget,density,r_norm,entropy,allocation_score\n"
        "bert.encoder.layer.0.attention.self.query,1024,1024,7,0.1,0.5,4.0,1.0\n"
        "bert.encoder.layer.0.attention.self.value,1024,1024,9,0.1,0.5,4.0,1.0\n")
    rows = figures.budget_rows(load_records([tmp_path]))
    assert [(r["kind"], r["budget"]) for r in rows] == [("q", 7.0), ("v", 9.0)]


def test_density_points_and_figure(tmp_path):
    from gem import figures

    for density in (0.001, 0.01):
        for seed, value in ((1, 0.6), (2, 0.7)):
            write_record(tmp_path, method="gem", density=density, seed=seed, test=value + density)
    write_record(tmp_path, method="full", seed=1)      # no effect: its density is the same, method differs
    points = figures.density_points(load_records([tmp_path]), methods=["gem"])
    assert [(p["density"], p["n"]) for p in points] == [(0.001, 2), (0.01, 2)]
    assert points[1]["mean"] == pytest.approx(66.0)
    assert points[0]["std"] == pytest.approx(statistics.stdev([60.1, 70.1]))
    out = tmp_path / "density.png"
    assert figures.main(["density", str(tmp_path), "--methods", "gem", "--output", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_density_figure_draws_only_swept_tasks(tmp_path):
    from gem import figures

    for density in (0.001, 0.01):
        write_record(tmp_path, method="gem", task="rte", density=density, seed=1)
    write_record(tmp_path, method="gem", task="cb", density=0.001, seed=1)  # one density: no curve
    fig = figures.plot_density(load_records([tmp_path]))
    assert [ax.get_title() for ax in fig.axes] == [figures.TASK_LABELS.get("rte", "rte")]
    only_one = figures.plot_density(load_records([tmp_path]), tasks=["cb"])
    assert "two or more" in only_one.axes[0].texts[0].get_text()


def test_cells_pooling_different_settings_are_flagged(tmp_path):
    write_record(tmp_path, method="gem", seed=1, density=0.001)
    write_record(tmp_path, method="gem", seed=2, density=0.01)
    path = write_record(tmp_path, method="full", seed=1, name="full_small")
    record = json.loads(path.read_text())
    record["config"]["task"]["num_train"] = 64
    path.write_text(json.dumps(record))
    write_record(tmp_path, method="full", seed=2, name="full_default")
    notes = "\n".join(build_table(load_records([tmp_path])).notes)
    assert "pool runs that differ in a setting" in notes
    assert "tiny-bert/gem/rte (config.method.density)" in notes
    assert "tiny-bert/full/rte (config.task.num_train)" in notes
    split = build_table(load_records([tmp_path]), group_by=["density", "config.task.num_train"])
    assert not any("differ in a setting" in n for n in split.notes)


@pytest.mark.parametrize("options, message", [
    (["--sweep-key", "config.lr_indx"], "--sweep-key config.lr_indx: no completed record has a value for this key"),
    (["--group-by", "config.method.densty"], "--group-by config.method.densty: no completed record has a value for this key"),
    (["--tasks", "rte,sts"], "--tasks: no completed run of sts; the records hold"),
    (["--methods", "gem,LoRA"], "--methods: no completed run of LoRA; the records hold"),
])
def test_a_typo_in_the_options_is_an_error_not_a_different_table(runs, options, message, capsys):
    with pytest.raises(SystemExit):
        tables.main([str(runs), "--select-by", "dev", *options])
    assert message in capsys.readouterr().err


def test_a_folder_without_records_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tables.main([str(tmp_path), "--output", str(tmp_path / "table.md")])
    assert "no run records (results.json) under" in capsys.readouterr().err
    assert not (tmp_path / "table.md").exists()


def test_wandb_without_login_is_a_clear_error(capsys):
    # No wandb server here: wandb.Api is mocked to fail as it does without credentials.
    pytest.importorskip("wandb")
    api = mock.MagicMock(side_effect=RuntimeError("api_key not configured (no-tty)"))
    with mock.patch("wandb.Api", api), pytest.raises(SystemExit):
        tables.main(["--wandb-project", "ent/gem"])
    err = capsys.readouterr().err
    assert "--wandb-project ent/gem: wandb could not list the runs (RuntimeError: api_key not configured" in err
    assert "wandb login" in err


def test_a_dev_choice_at_the_end_of_the_grid_is_noted(tmp_path):
    # three LRs: the largest wins on dev for gem (the search may have stopped short), the middle for lora
    for lr, dev in [(1e-4, 0.5), (1e-3, 0.6), (1e-2, 0.7)]:
        write_record(tmp_path, method="gem", lr=lr, dev=dev, name=f"gem_{lr}")
        write_record(tmp_path, method="lora", lr=lr, dev=0.8 - abs(dev - 0.6), name=f"lora_{lr}")
    for lr, dev in [(1e-4, 0.5), (1e-3, 0.6)]:  # two LRs: every choice is an end; nothing to say
        write_record(tmp_path, method="bitfit", lr=lr, dev=dev, name=f"bitfit_{lr}")
    notes = build_table(load_records([tmp_path]), select_by="dev").notes
    edge = [n for n in notes if n.startswith("note:")]
    assert edge == ["note: 1 cell(s) chose the largest or smallest of the swept values, so the best setting may "
                    "lie beyond the grid: tiny-bert/gem/rte (config.optim.lr=0.01, the largest of 3)"]


def test_budget_rows_count_a_seeds_selection_once_and_never_mix_densities(tmp_path):
    from gem import figures

    # an LR search: seed 1 at two LRs holds one selection; seed 2 another
    for name, seed, scale in (("lr0_s1", 1, 1), ("lr1_s1", 1, 1), ("lr0_s2", 2, 3)):
        path = write_record(tmp_path / name, method="gem", task="rte", seed=seed)
        record = json.loads(path.read_text())
        record["gem"]["budgets"] = {k: v * scale for k, v in record["gem"]["budgets"].items()}
        path.write_text(json.dumps(record))
    rows = figures.budget_rows(load_records([tmp_path]))
    first = next(r for r in rows if r["kind"] == "q" and r["layer"] == 0)
    assert first["runs"] == 2 and first["budget"] == pytest.approx((100 + 300) / 2)
    write_record(tmp_path / "dense", method="gem", task="rte", seed=3, density=0.01)
    with pytest.raises(ValueError, match="different densities"):
        figures.budget_rows(load_records([tmp_path]))
    assert figures.budget_rows(load_records([tmp_path]), method="full") == []
    assert {r["runs"] for r in figures.budget_rows(load_records([tmp_path]), density=0.01)} == {1}
    assert figures.main(["budgets", str(tmp_path), "--density", "0.001", "--output", str(tmp_path / "b.png")]) == 0
    with pytest.raises(SystemExit):
        figures.main(["budgets", str(tmp_path), "--output", str(tmp_path / "b.png")])


def test_select_by_dev_without_dev_scores_says_so(tmp_path):
    for lr, test in ((1e-4, 0.4), (1e-3, 0.9)):
        write_record(tmp_path, method="gem", lr=lr, dev=None, test=test)
    table = build_table(load_records([tmp_path]), select_by="dev")
    assert any("no dev score to choose by" in note and "tiny-bert/gem/rte" in note for note in table.notes)
    for lr, dev in ((1e-4, 0.5), (1e-3, 0.6)):
        write_record(tmp_path / "with_dev", method="gem", lr=lr, dev=dev)
    table = build_table(load_records([tmp_path / "with_dev"]), select_by="dev")
    assert not any("no dev score" in note for note in table.notes)


def test_runs_with_other_selection_rules_are_not_pooled_silently(tmp_path):
    write_record(tmp_path, method="gem", seed=1)
    path = write_record(tmp_path, method="gem", seed=2)
    record = json.loads(path.read_text())
    record["config"]["method"]["score"] = "weight_times_gradient"
    path.write_text(json.dumps(record))
    notes = build_table(load_records([tmp_path])).notes
    assert any("config.method.score" in note for note in notes)
