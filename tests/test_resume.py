"""A run killed with SIGKILL mid-epoch and resumed with ckpt_path=last ends bit-identical (CPU, and DDP on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import RUN_PY, TINY_RUN, cli_env, run_cli

# 96 examples / batch 16 = 6 steps per epoch; a resume checkpoint every 5 steps lands mid-epoch.
RESUMABLE = [*[o for o in TINY_RUN if not o.startswith(("task.num_train", "trainer.max_epochs"))],
             "task.num_train=96", "trainer.max_epochs=3", "method=gem", "method.num_grad_samples=32",
             "resume_checkpoints.every_n_train_steps=5"]


def _kill_after_first_checkpoint(args: list[str], run_dir, cwd) -> None:
    # A session of its own, so the kill reaches every process of the run (DDP's other ranks too).
    process = subprocess.Popen([sys.executable, str(RUN_PY), *args], cwd=cwd, env=cli_env(), start_new_session=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "lightning" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # no handler runs, as in a preemption or an OOM kill
    process.wait()
    assert checkpoint.exists(), "the run never wrote a resume checkpoint"


def _assert_same_run(whole, resumed) -> None:
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    assert b["status"] == "completed" and b["resumed_from"].endswith("last.ckpt")
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"]
    assert b["gem"]["changed_outside_mask"] == 0
    for name in ("delta/sparse_delta.safetensors", "head.safetensors"):  # masks, deltas, head: bit-equal
        left, right = load_file(whole / "checkpoint" / name), load_file(resumed / "checkpoint" / name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    assert not (resumed / "lightning").exists()  # removed once the run completed


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    args = [*RESUMABLE, f"data_dir={data_dir}"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli([*args, f"hydra.run.dir={whole}"], cwd=tmp_path).returncode == 0

    _kill_after_first_checkpoint([*args, f"hydra.run.dir={killed}"], killed, tmp_path)
    saved = torch.load(killed / "lightning" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 0 < saved["global_step"] < 18 and saved["global_step"] % 6 != 0  # really mid-epoch
    assert json.loads((killed / "results.json").read_text())["status"] == "running"

    resumed = run_cli([*args, f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(whole, killed)


def test_ddp_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    # Two ranks (gloo): 96 examples / (2 x 16) = 3 steps per epoch; the step-5 checkpoint is
    # mid-epoch, so each rank must skip exactly the batches it had trained on in epoch 1.
    args = [*RESUMABLE, f"data_dir={data_dir}", "trainer=ddp_cpu", "trainer.accelerator=cpu"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = run_cli([*args, f"hydra.run.dir={whole}"], cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]

    _kill_after_first_checkpoint([*args, f"hydra.run.dir={killed}"], killed, tmp_path)
    saved = torch.load(killed / "lightning" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 0 < saved["global_step"] < 9 and saved["global_step"] % 3 != 0  # really mid-epoch

    resumed = run_cli([*args, f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=tmp_path, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "restarts from its first batch" not in resumed.stderr
    _assert_same_run(whole, killed)


def test_ckpt_path_last_without_a_checkpoint_is_a_clear_error(data_dir, tmp_path):
    result = run_cli([*RESUMABLE, f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'new'}", "ckpt_path=last"],
                     cwd=tmp_path)
    assert result.returncode != 0
    assert "no checkpoint at" in result.stderr and "hydra.run.dir=<its run dir>" in result.stderr
    assert json.loads((tmp_path / "new" / "results.json").read_text())["status"] == "failed"
