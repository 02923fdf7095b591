"""gem.manifest: the command behind each record, rebuilt from Hydra's saved overrides."""

from __future__ import annotations

import json

from gem.manifest import main, manifest_markdown, run_command
from gem.tables import load_records


def write_run(root, name, overrides, status="completed", acc=0.75):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    record = {"status": status, "task": "cb", "method": "gem", "seed": 2, "main_metric": "test/acc",
              "metrics": {"test/acc": acc}, "time_s": {"fit": 12.5}, "git_commit": "0123456789abcdef+dirty",
              "config": {"optim": {"lr": 0.001}, "method": {"density": 0.0005}},
              "host": {"platform": "Linux-x", "cpu_count": 2, "gpus": []}, "versions": {"torch": "2.13.0"}}
    (run / "results.json").write_text(json.dumps(record))
    return run


def test_command_reruns_into_the_same_folder_and_hides_secrets(tmp_path):
    write_run(tmp_path, "a", ["task=cb", "method=gem", "logger.api_key=abc123", "seed=2"])
    (record,) = load_records([tmp_path])
    command = run_command(record)
    assert command.startswith("python run.py task=cb method=gem ")
    assert "abc123" not in command and "logger.api_key=<redacted>" in command
    assert command.endswith(f"hydra.run.dir={tmp_path / 'a'}")


def test_manifest_lists_every_record_with_its_numbers_and_the_machines(tmp_path, capsys):
    write_run(tmp_path, "a", ["task=cb"], acc=0.6875)
    write_run(tmp_path, "b", ["task=cb"], status="failed")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text("{}")  # no overrides: the command is marked unknown
    text = manifest_markdown(load_records([tmp_path]))
    rows = [line for line in text.splitlines() if line.startswith(f"| {tmp_path}")]
    assert len(rows) == 3
    assert "| completed | cb | gem | 2 | 0.001 | 0.0005 | test/acc 0.6875 | 12.5 | 01234567+dirty |" in rows[0]
    assert "| failed |" in rows[1]
    assert "no .hydra/overrides.yaml" in rows[2]
    assert "- Linux-x, 2 CPUs, no GPU (2)" in text and "3 records." in text
    assert "- ?, ? CPUs, GPU not recorded (1)" in text
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such record folder" in capsys.readouterr().err


def test_the_records_own_overrides_win_over_hydras_file(tmp_path):
    # Hydra rewrites .hydra/overrides.yaml at every start in a folder (a resume's, a refused
    # rerun's); the record keeps the command that made the run.
    run = write_run(tmp_path, "a", ["task=cb", "ckpt_path=last", "optim.lr=0.5"])
    record = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**record, "overrides": ["task=cb", "method=gem", "seed=2"]}))
    (loaded,) = load_records([tmp_path])
    assert run_command(loaded) == f"python run.py task=cb method=gem seed=2 hydra.run.dir={tmp_path / 'a'}"


def test_multirun_job_folders_come_in_job_order(tmp_path):
    # Hydra numbers multirun jobs 0, 1, ..., 10, 11: as text "10" sorts before "2".
    for job in (0, 2, 10, 1):
        write_run(tmp_path, str(job), [f"seed={job}"])
    text = manifest_markdown(load_records([tmp_path]))
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith(f"| {tmp_path}")]
    assert rows == [f"| {tmp_path / str(job)}" for job in (0, 1, 2, 10)]
