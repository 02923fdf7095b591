"""A run killed with SIGKILL mid-epoch and resumed with ckpt_path=last ends bit-identical (CPU, and DDP on CPU);
and a resume at any step, epoch ends included, continues with exactly the remaining batches."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from conftest import RUN_PY, TINY_RUN, cli_env, run_cli
from gem.lit.datamodule import TaskDataModule
from gem.lit.resume import ResumeCheckpoint

# 96 examples / batch 16 = 6 steps per epoch; a resume checkpoint every 5 steps lands mid-epoch.
RESUMABLE = [*[o for o in TINY_RUN if not o.startswith(("task.num_train", "trainer.max_epochs"))],
             "task.num_train=96", "trainer.max_epochs=3", "method=gem", "method.num_grad_samples=32",
             "resume_checkpoints.every_n_train_steps=5"]


# run.py, except that right after the resume checkpoint of step DIE_AT is written, the run's
# whole process group (DDP's other ranks too) gets SIGKILL: no handler runs, as in a preemption
# or an OOM kill, and the kill lands at a known step.
_DIES_AFTER_CHECKPOINT = """
import os, runpy, signal, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[2])))  # gem from run.py's folder, as run.py imports it
from gem.lit.resume import ResumeCheckpoint
save, die_at = ResumeCheckpoint.save, int(sys.argv[1])
def save_then_die(self, trainer):
    save(self, trainer)
    if trainer.global_step == die_at and trainer.is_global_zero:
        os.killpg(0, signal.SIGKILL)
ResumeCheckpoint.save = save_then_die
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _killed_after_checkpoint(args: list[str], step: int, cwd) -> None:
    process = subprocess.run([sys.executable, "-c", _DIES_AFTER_CHECKPOINT, str(step), str(RUN_PY), *args], cwd=cwd,
                             env=cli_env(), start_new_session=True, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=400)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]


def _assert_same_run(whole, resumed) -> None:
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    assert b["status"] == "completed" and b["resumed_from"].endswith("last.ckpt")
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"]
    assert a["train_steps"] == b["train_steps"] > 0  # no epoch cut short after the resume
    assert b["gem"]["changed_outside_mask"] == 0
    # masks (index gaps), deltas and head: bit-equal
    left = load_file(whole / "checkpoint" / "adapter_model.safetensors")
    right = load_file(resumed / "checkpoint" / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    assert [k for k in left if not torch.equal(left[k], right[k])] == []
    assert not (resumed / "lightning").exists()  # removed once the run completed


def _assert_masks_restored(resumed) -> None:
    # the resumed fit takes its masks from the checkpoint: no second gradient pass
    output = resumed.stdout + resumed.stderr  # Hydra's console log handler writes to stdout
    assert "masks restored from" in output and "entries selected of K=" not in output


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    args = [*RESUMABLE, f"data_dir={data_dir}"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli([*args, f"hydra.run.dir={whole}"], cwd=tmp_path).returncode == 0

    _killed_after_checkpoint([*args, f"hydra.run.dir={killed}"], 5, tmp_path)
    saved = torch.load(killed / "lightning" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5  # mid-epoch: 6 steps per epoch
    assert json.loads((killed / "results.json").read_text())["status"] == "running"

    resumed = run_cli([*args, f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_masks_restored(resumed)
    _assert_same_run(whole, killed)


def test_ddp_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    # Two ranks (gloo): 96 examples / (2 x 16) = 3 steps per epoch; the step-5 checkpoint is
    # mid-epoch, so each rank must skip exactly the batches it had trained on in epoch 1.
    args = [*RESUMABLE, f"data_dir={data_dir}", "trainer=ddp_cpu", "trainer.accelerator=cpu"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = run_cli([*args, f"hydra.run.dir={whole}"], cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]

    _killed_after_checkpoint([*args, f"hydra.run.dir={killed}"], 5, tmp_path)
    saved = torch.load(killed / "lightning" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5  # mid-epoch: 3 steps per epoch and rank

    resumed = run_cli([*args, f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=tmp_path, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "restarts from its first batch" not in resumed.stderr
    _assert_masks_restored(resumed)
    _assert_same_run(whole, killed)


def test_ckpt_path_last_without_a_checkpoint_is_a_clear_error(data_dir, tmp_path):
    result = run_cli([*RESUMABLE, f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'new'}", "ckpt_path=last"],
                     cwd=tmp_path)
    assert result.returncode != 0
    assert "no checkpoint at" in result.stderr and "hydra.run.dir=<its run dir>" in result.stderr
    assert not (tmp_path / "new" / "results.json").exists()  # refused before anything was written


# --------------------------------------------------------------------------- every resume position
class _Probe(L.LightningModule):
    """Records each training batch (epoch, example ids) and each validation; can die at a step."""

    def __init__(self, die_at_step: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches, self.validated, self.die_at_step = [], [], die_at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.die_at_step:
            raise RuntimeError("killed")  # after the checkpoint of the previous step was written
        self.batches.append((self.current_epoch, batch.tolist()))
        return (self.weight * batch.float()).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.validated.append(self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module, checkpoint_dir, every_n_steps, size, batch_size, ckpt_path=None, workers=0):
    task = SimpleNamespace(train=list(range(size)), dev=[0, 1], test=[0, 1])
    data = TaskDataModule(task, torch.tensor, batch_size=batch_size, eval_batch_size=2, seed=3, num_workers=workers)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[ResumeCheckpoint(checkpoint_dir / "last.ckpt", every_n_steps)])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("size,batch_size,step,workers", [
    (24, 4, 2, 0),    # early in the first epoch
    (24, 4, 5, 0),    # the epoch's second-to-last batch
    (24, 4, 6, 0),    # the epoch's last batch: the next epoch must start from its beginning
    (24, 5, 5, 0),    # a short last batch (24 = 4 x 5 + 4), checkpoint on it
    (23, 5, 7, 0),    # mid-epoch in the second epoch
    (24, 4, 12, 0),   # the end of the second epoch
    (24, 4, 5, 1),    # a worker process draws the indices as soon as the iterator exists
    (24, 4, 6, 1),
    (24, 4, None, 0),  # no step checkpoints: the epoch-end one (the run dies in the second epoch)
])
def test_resume_at_any_step_continues_with_exactly_the_remaining_batches(tmp_path, size, batch_size, step, workers):
    whole = _Probe()
    _fit(whole, tmp_path / "whole", None, size, batch_size, workers=workers)
    every, dies = (step, step) if step else (None, 9)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(_Probe(die_at_step=dies), tmp_path / "killed", every, size, batch_size, workers=workers)
    step = step or 6  # where the epoch-end checkpoint stands
    resumed = _Probe()
    _fit(resumed, tmp_path / "resumed", None, size, batch_size, ckpt_path=tmp_path / "killed" / "last.ckpt",
         workers=workers)
    assert resumed.batches == whole.batches[step:]  # the same batches, in order, none cut, none repeated
    assert resumed.validated == whole.validated[-len(resumed.validated):] and resumed.validated[-1] == 2
