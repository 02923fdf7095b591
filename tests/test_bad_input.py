"""Bad input fails fast and clearly: the message names the cause and the fix, the command exits
non-zero (or the right exception type reaches an in-process caller), and no record ever says
`completed` (a run that started leaves a `failed` record).

Covered elsewhere, not repeated here: wandb online without an API key
(tests/test_pipeline.py::test_online_wandb_without_key_fails_clearly_before_contacting_it) and
offline without a data dir (tests/test_pipeline.py::test_offline_without_data_dir_is_a_fast_data_error).
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

from conftest import TINY_RUN, run_cli, run_in_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

RTE_LABELS = ("entailment", "not_entailment")


def write_rte(root: Path, rows: list[dict], files=("train.jsonl", "val.jsonl")) -> Path:
    """A hand-made data dir in the official SuperGLUE layout: <root>/super_glue/RTE/{train,val}.jsonl."""
    folder = root / "super_glue" / "RTE"
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def rte_rows(n: int = 24, **overrides_by_index) -> list[dict]:
    rows = [{"premise": f"Sentence number {i} is here.", "hypothesis": "A sentence is here.",
             "label": RTE_LABELS[i % 2], "idx": i} for i in range(n)]
    for key, row in overrides_by_index.items():
        rows[int(key.lstrip("i"))].update(row)
    return rows


def assert_not_completed(run_dir: Path, message: str | None = None) -> dict | None:
    """No `completed` record anywhere under run_dir; a record that exists is `failed` with the error."""
    records = [json.loads(p.read_text()) for p in run_dir.rglob("results.json")] if run_dir.exists() else []
    assert all(r["status"] != "completed" for r in records)
    for r in records:
        assert r["status"] == "failed"
        if message is not None:
            assert message in r["error"]
    return records[0] if records else None


def fails_in_process(overrides: list[str], out: Path, error_type: type, *patterns: str) -> str:
    """Run in-process; assert the exception type, each regex in its message, and a failed record."""
    with pytest.raises(error_type) as info:
        run_in_process(overrides, out)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    record = assert_not_completed(out, message)
    assert record is not None, "the run started, so it must leave a failed record"
    assert "traceback" in record
    return message


def tiny(data_dir: Path, *more: str) -> list[str]:
    return [*TINY_RUN, "save_checkpoint=false", f"data_dir={data_dir}", *more]


# --------------------------------------------------------------------------- Hydra: the command line
@pytest.mark.parametrize("override,patterns", [
    ("method=nope", [r"Could not find 'method/nope'", r"Available options in 'method'"]),
    # `+foo=1` is allowed (it adds a key); a key missing from an existing group is a typo.
    ("optim.nope=1", [r"Could not override 'optim.nope'", r"To append to your config use \+optim.nope=1"]),
])
def test_unknown_option_or_key_is_a_hydra_error(override, patterns, tmp_path):
    proc = run_cli([override, "model=tiny-bert", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    for pattern in patterns:
        assert re.search(pattern, proc.stderr), proc.stderr[-2000:]
    assert not list(tmp_path.rglob("results.json"))


def test_lr_index_outside_the_preset_grid(tmp_path, data_dir):
    proc = run_cli(["experiment=cpu_minilm_table", "model=tiny-bert", "logger=none", "method=gem", "lr_index=5",
                    f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=180)
    assert proc.returncode != 0
    assert "lr_index=5 is outside lr_grids.gem (which has 2 entries)" in proc.stderr, proc.stderr[-2000:]
    assert "use lr_index between 0 and 1" in proc.stderr
    assert_not_completed(tmp_path)


def test_unknown_eval_order_fails_before_loading(tmp_path, data_dir, monkeypatch):
    import gem.train

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad setting was noticed")

    monkeypatch.setattr(gem.train, "load_model", no_loading)
    fails_in_process(tiny(data_dir, "method=bitfit", "eval_order=shortest"), tmp_path / "run", ValueError,
                     r"eval_order='shortest' is not one of dataset, length", r"`length` batches examples longest first")


# --------------------------------------------------------------------------- method settings
@pytest.mark.parametrize("override,patterns", [
    ("method.density=0", [r"density=0 \(method\.density\) is impossible", r"must lie in \(0, 1\)"]),
    ("method.density=1.5", [r"density=1\.5 \(method\.density\) is impossible", r"must lie in \(0, 1\)"]),
    ("method.num_grad_samples=0", [r"num_grad_samples=0 \(method\.num_grad_samples\)", r"set it to at least 1"]),
])
def test_impossible_gem_settings(override, patterns, tmp_path, data_dir):
    from gem.methods import MethodError

    fails_in_process(tiny(data_dir, "method=gem", override), tmp_path / "run", MethodError, *patterns)


@pytest.mark.parametrize("method,override", [
    ("gem", "model.target_modules=[q_proj]"),      # a model without the configured projections
    ("lora", "method.target_modules=[qeury]"),     # a typo: names that match nothing
    ("gem", "model.target_modules=[query,valu]"),  # one name right, one typo: never a silent half-method
])
def test_target_modules_matching_nothing_list_the_linear_names(method, override, tmp_path, data_dir):
    from gem.methods import MethodError

    fails_in_process(tiny(data_dir, f"method={method}", override), tmp_path / "run", MethodError,
                     r"match no linear layer", r"linear layers are named \[.*'query'.*'value'.*\]",
                     r"Set model\.target_modules \(or method\.target_modules\)")


def test_nan_gradients_leave_no_usable_signal():
    """A loss that turns NaN in the gradient pass: every matrix is excluded, so selection refuses."""
    import torch

    from gem.core.gradient_pass import training_loss
    from gem.methods import build_method
    from gem.models.tiny import tiny_bert

    loaded = tiny_bert()
    method = build_method("gem", ["query", "value"], num_grad_samples=4)
    model = method.prepare(loaded.model, loaded.head_parameter_names)
    ids = torch.randint(1000, 2000, (4, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    with pytest.raises(ValueError, match=r"no usable signal.*NaN/inf gradients.*check the loss"):
        method.select(model, [batch], lambda m, b: training_loss(m, b) * float("nan"))
    assert not method.selected


# --------------------------------------------------------------------------- data
def test_empty_train_split_after_sampling(tmp_path, data_dir):
    from gem.data import DataError

    fails_in_process(tiny(data_dir, "method=bitfit", "task.num_train=0"), tmp_path / "run", DataError,
                     r"sampled train split is empty", r"set task\.num_train to at least 1")


def test_label_outside_the_label_set_names_the_example(tmp_path):
    from gem.data import DataError

    data = write_rte(tmp_path / "data", rte_rows(i3={"label": "maybe"}))
    fails_in_process(tiny(data, "method=bitfit"), tmp_path / "run", DataError,
                     r"example rte/train/3 has label 'maybe'", r"outside the label set \['entailment', 'not_entailment'\]")


def test_missing_data_file_names_it_and_the_layout(tmp_path):
    from gem.data import DataError

    data = write_rte(tmp_path / "data", rte_rows(), files=("val.jsonl",))  # no train.jsonl
    fails_in_process(tiny(data, "method=bitfit"), tmp_path / "run", DataError,
                     r"missing file\(s\) \S*/super_glue/RTE/train\.jsonl\.", r"Expected layout under",
                     r"train: .*super_glue/RTE/train\.jsonl; test: .*super_glue/RTE/val\.jsonl")


def test_an_empty_or_truncated_data_file_is_named_with_what_is_wrong(tmp_path):
    from gem.data import DataError

    data = write_rte(tmp_path / "data", rte_rows())
    train = data / "super_glue" / "RTE" / "train.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:3] + [lines[3][: len(lines[3]) // 2]]) + "\n")  # cut mid-line
    fails_in_process(tiny(data, "method=bitfit"), tmp_path / "run1", DataError,
                     r"could not read \S*train\.jsonl as jsonl: line 4 is not valid JSON", r"truncated or corrupt")
    train.write_text("")
    fails_in_process(tiny(data, "method=bitfit"), tmp_path / "run2", DataError,
                     r"could not read \S*train\.jsonl as jsonl: the file is empty")


def test_max_length_beyond_the_model_is_clamped_with_a_note(tmp_path, caplog):
    """Decision: a task.max_length longer than the model's position table (tiny-bert: 512) is clamped
    to it, with a warning and a note in the record (unclamped, a 700-token example crashes BERT)."""
    long_rows = rte_rows(i0={"premise": " ".join(["word"] * 700)}, i1={"premise": " ".join(["other"] * 700)})
    data = write_rte(tmp_path / "data", long_rows)
    overrides = [*TINY_RUN, "method=bitfit", "save_checkpoint=false", f"data_dir={data}", "task.max_length=4096",
                 "task.num_train=8", "task.num_dev=8", "task.num_test=24"]  # the test split holds both long rows
    with caplog.at_level("WARNING"):
        record = run_in_process(overrides, tmp_path / "run")
    assert record["status"] == "completed"
    note = "max_length 4096 (task.max_length, or model.max_length for decoders) exceeds what the model can embed " \
           "(512 positions); sequences are truncated to 512 instead"
    assert note in record["data"]["notes"]
    assert note in caplog.text


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture
def sparse_checkpoint(tmp_path):
    """A sparse-mask checkpoint (random scores need no gradient pass) of tiny-bert seed 0, and a loader."""
    from gem.methods import build_method
    from gem.models.tiny import tiny_bert

    loaded = tiny_bert()
    method = build_method("gem", ["query", "value"], density=0.001, score="random", budget="uniform")
    model = method.select(method.prepare(loaded.model, loaded.head_parameter_names), seed=0)
    directory = method.save(model, tmp_path / "checkpoint", extra_config={"base_model": "tiny:bert"})

    def load_into_fresh(seed: int = 0):
        fresh_loaded = tiny_bert(seed=seed)
        fresh = build_method("gem", ["query", "value"], density=0.001, score="random", budget="uniform")
        fresh.load(fresh.prepare(fresh_loaded.model, fresh_loaded.head_parameter_names), directory)
        return fresh

    assert load_into_fresh().selected  # the intact checkpoint loads
    return directory, load_into_fresh


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_adapter_is_a_clear_error(sparse_checkpoint):
    from gem.methods import MethodError

    directory, load_into_fresh = sparse_checkpoint
    truncate(directory / "adapter_model.safetensors")
    with pytest.raises(MethodError, match=r"adapter_model\.safetensors is corrupt or truncated.*copy it again"):
        load_into_fresh()


def test_truncated_trained_file_is_a_clear_error(tmp_path):
    from gem.methods import MethodError, build_method
    from gem.models.tiny import tiny_bert

    loaded = tiny_bert()
    bitfit = build_method("bitfit", ["query", "value"])
    model = bitfit.prepare(loaded.model, loaded.head_parameter_names)
    saved = bitfit.save(model, tmp_path / "bitfit")
    truncate(saved / "trained.safetensors")
    with pytest.raises(MethodError, match=r"trained\.safetensors is corrupt or truncated.*save_checkpoint=true"):
        bitfit.load(model, saved)


def test_delta_for_another_base_model_is_rejected(sparse_checkpoint):
    from gem.methods import MethodError

    _, load_into_fresh = sparse_checkpoint
    # tiny-bert with model.seed=1 has the same architecture and different pre-trained weights.
    with pytest.raises(MethodError, match=r"trained on base model 'tiny:bert' with fingerprint.*Load the base model"):
        load_into_fresh(seed=1)


# --------------------------------------------------------------------------- the record and training
@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_full_disk_keeps_the_previous_record(failing, tmp_path, monkeypatch):
    import gem.records
    from gem.records import RecordError, RunRecord

    record = RunRecord(tmp_path, method="gem", task="rte", model="tiny-bert", seed=1, config={"seed": 1})
    record.write()
    before = (tmp_path / "results.json").read_text()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gem.records.os, failing, no_space)
    record.data["metrics"] = {"test/acc": 1.0}
    with pytest.raises(RecordError, match=r"could not write the run record .*results\.json.*No space left on device"
                                          r".*Free disk space"):
        record.finish("completed")
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_text() == before
    assert json.loads(before)["status"] == "running"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_non_finite_loss_names_the_learning_rate(tmp_path, data_dir):
    from gem.lit.module import NonFiniteLossError

    fails_in_process(tiny(data_dir, "method=full", "optim.lr=1e30"), tmp_path / "run", NonFiniteLossError,
                     r"training loss is (nan|inf)", r"lower optim\.lr \(now 1e\+30\)")


# --------------------------------------------------------------------------- setting types, run folders
@pytest.mark.parametrize("override, pattern", [
    ("optim.lr=abc", r"optim\.lr='abc' must be a finite number; e\.g\. optim\.lr=1e-3"),
    ("seed=1.5", r"seed=1\.5 must be a whole number"),
    ("batch_size=abc", r"batch_size='abc' must be a whole number"),
    ("task.num_train=abc", r"task\.num_train='abc' must be a whole number"),
    ("method.num_grad_samples=abc", r"method\.num_grad_samples='abc' must be a whole number"),
    ("method.density=abc", r"method\.density='abc' must be a finite number"),
    ("trainer.max_epochs=0", r"trainer\.max_epochs=0 trains nothing"),
])
def test_mistyped_settings_fail_before_anything_loads(override, pattern, tmp_path, data_dir, monkeypatch):
    import gem.train
    from gem.run_checks import RunSetupError

    monkeypatch.setattr(gem.train, "load_task", lambda *a, **k: pytest.fail("data loaded before the check"))
    # a failed record, so a refused job of a multirun is still counted in the table's footer
    fails_in_process(tiny(data_dir, "method=gem", override), tmp_path / "run", RunSetupError, pattern)


def test_a_completed_run_folder_is_never_overwritten_by_mistake(tmp_path, data_dir):
    from gem.run_checks import RunSetupError

    out = tmp_path / "run"
    first = run_in_process(tiny(data_dir, "method=bitfit", "save_checkpoint=true"), out)
    before = (out / "results.json").read_bytes()
    assert first["status"] == "completed" and first["overrides"] is None  # in-process: no Hydra command line
    for again, pattern in [([], r"already holds a completed run.*another hydra\.run\.dir.*overwrite=true"),
                           (["ckpt_path=last"], r"holds a completed run: there is nothing to resume"),
                           (["optim.lr=abc"], r"already holds a completed run")]:
        with pytest.raises(RunSetupError, match=pattern):
            run_in_process(tiny(data_dir, "method=bitfit", *again), out)
        assert (out / "results.json").read_bytes() == before
    with pytest.raises(RunSetupError, match=r"overwrite='no' must be true or false"):
        run_in_process(tiny(data_dir, "method=bitfit", "overwrite=no"), out)
    assert (out / "results.json").read_bytes() == before
    # overwrite=true with settings that fail a check: refused before anything is removed
    for bad, error in [("method.density=2", "MethodError"), ("optim.lr=abc", "RunSetupError")]:
        with pytest.raises(Exception, match=r"density=2 \(method\.density\) is impossible|optim\.lr='abc'") as caught:
            run_in_process(tiny(data_dir, "method=gem", "overwrite=true", bad), out)
        assert type(caught.value).__name__ == error
        assert (out / "results.json").read_bytes() == before and (out / "checkpoint").is_dir()
    # overwrite=true replaces the run, and the old checkpoint does not outlive its record
    assert (out / "checkpoint").is_dir()
    again = run_in_process(tiny(data_dir, "method=gem", "method.num_grad_samples=8", "overwrite=true"), out)
    assert again["status"] == "completed" and again["method"] == "gem" and not (out / "checkpoint").exists()


def test_a_rerun_into_a_completed_folder_leaves_hydras_files_alone(tmp_path, data_dir):
    # Hydra saves .hydra/ before the job starts; the check runs in a Hydra callback before that.
    out = tmp_path / "run"
    first = run_cli([*tiny(data_dir, "method=bitfit"), f"hydra.run.dir={out}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()}
    record = (out / "results.json").read_bytes()
    again = run_cli([*tiny(data_dir, "method=gem"), f"hydra.run.dir={out}"], cwd=tmp_path)
    assert again.returncode != 0 and "already holds a completed run" in again.stderr
    assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == saved
    assert (out / "results.json").read_bytes() == record
    # overwrite=true whose settings fail a check: Hydra rewrote .hydra/, the refusal puts it back
    refused = run_cli([*tiny(data_dir, "method=gem"), "overwrite=true", "method.density=2", f"hydra.run.dir={out}"],
                      cwd=tmp_path)
    assert refused.returncode != 0 and "the completed run in" in refused.stderr
    assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == saved
    assert (out / "results.json").read_bytes() == record and not (out / ".hydra.before_overwrite").exists()
    replaced = run_cli([*tiny(data_dir, "method=full"), "overwrite=true", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "method=full" in (out / ".hydra" / "overrides.yaml").read_text()
    assert not (out / ".hydra.before_overwrite").exists()


def test_an_lr_index_outside_the_grid_leaves_a_failed_record(tmp_path, data_dir):
    # a refused multirun job must still be counted in the table's footer
    out = tmp_path / "run"
    with pytest.raises(Exception, match=r"lr_index=7"):
        run_in_process(tiny(data_dir, "experiment=cpu_minilm_table", "model=tiny-bert", "method=bitfit",
                            "lr_index=7"), out)
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "failed" and "lr_index=7" in record["error"] and record["method"] == "bitfit"


def test_a_resume_with_other_settings_is_refused(tmp_path, data_dir):
    # A killed run: its record says running and its resume checkpoint exists.
    from gem.run_checks import RunSetupError

    out = tmp_path / "run"
    args = tiny(data_dir, "method=bitfit", "resume_checkpoints.keep_after_success=true")
    run_in_process(args, out)
    record = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps({**record, "status": "running"}))
    with pytest.raises(RunSetupError, match=r"settings differ from the killed run's \(optim\.lr: 0\.001 -> 0\.5\)"):
        run_in_process([*args, "ckpt_path=last", "optim.lr=0.5"], out)
    assert json.loads((out / "results.json").read_text())["status"] == "running"
    with pytest.raises(RunSetupError, match=r"settings differ from the killed run's \(method\.name: 'bitfit' -> 'full'"):
        run_in_process([*args, "ckpt_path=last", "method=full", "optim.lr=0.5"], out)
    with pytest.raises(RunSetupError, match=r"results\.json is not a training checkpoint"):
        run_in_process([*args, f"ckpt_path={out / 'results.json'}"], tmp_path / "elsewhere")
    assert json.loads((out / "results.json").read_text())["status"] == "running"
    # the same settings (and a moved data folder) resume
    assert run_in_process([*args, "ckpt_path=last"], out)["status"] == "completed"


def test_one_target_module_given_as_a_string_is_a_list_of_one():
    from gem.methods import build_method

    assert build_method("gem", "query").target_modules == ["query"]
    assert build_method("lora", "value").target_modules == ["value"]


def test_more_gradient_samples_than_training_examples_is_said(tmp_path, data_dir, caplog):
    with caplog.at_level("WARNING", logger="gem.lit.sparse_selection"):
        record = run_in_process(tiny(data_dir, "method=gem", "method.num_grad_samples=500"), tmp_path / "run")
    assert record["gem"]["gradient_samples"] == 32
    assert "method.num_grad_samples=500 but the training set holds 32 examples" in caplog.text


def test_no_dev_set_is_said_in_the_record(tmp_path, data_dir):
    record = run_in_process(tiny(data_dir, "method=bitfit", "task.num_dev=0"), tmp_path / "run")
    assert any("no dev set" in note for note in record["data"]["notes"])


def test_a_gpu_trainer_without_a_gpu_says_which_trainer_to_use(tmp_path, data_dir):
    import torch

    from gem.run_checks import RunSetupError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fails_in_process([o for o in tiny(data_dir, "method=bitfit") if not o.startswith("trainer.accelerator")]
                     + ["trainer=gpu"], tmp_path / "run", RunSetupError,
                     r"trainer\.accelerator=gpu but no CUDA GPU is visible here; use trainer=cpu")


def test_a_resume_across_new_config_keys_and_other_folders(tmp_path, data_dir):
    # Keys added to the code since the killed run started are not "changed settings", and an
    # explicit checkpoint path may resume into another folder (trainer.default_root_dir differs).
    from gem.run_folder import config_changes

    old = {"optim": {"lr": 0.001}, "task": {"label_map": {"0": "a"}, "x": float("nan")}, "lr_grids": {"lora": [1]},
           "trainer": {"default_root_dir": "/a"}}
    new = {"optim": {"lr": 0.001}, "task": {"label_map": {0: "a"}, "x": float("nan")}, "lr_grids": {"lora": [2]},
           "trainer": {"default_root_dir": "/b"}, "extensions": [], "method": {"gradient_pass_mode": "eval"}}
    new = __import__("json").loads(__import__("json").dumps(new))  # as the check compares: JSON keys
    assert config_changes(old, new) == []
    assert config_changes(old, {**new, "optim": {"lr": 0.5}}) == [("optim.lr", 0.001, 0.5)]
