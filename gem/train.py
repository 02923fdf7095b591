"""One run: task -> model -> method -> Lightning fit/test -> run record.

`run.py` only calls `run(cfg)`. Everything here is glue: the method's math lives in
`gem.core`, the methods in `gem.methods`, data in `gem.data`, models in `gem.models`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from gem.config import load_extensions
from gem.data import encoder_collator, load_task
from gem.data.causal_collate import causal_collator
from gem.lit.datamodule import TaskDataModule, check_eval_order
from gem.lit.epoch_summary import EpochSummary
from gem.lit.causal_module import CausalLMModule
from gem.lit.module import FineTuneModule
from gem.lit.resume import ResumeCheckpoint
from gem.lit.sparse_selection import SparseSelection
from gem.methods import method_from_config
from gem.models import fit_max_length, load_model
from gem.records import RunRecord, apply_umask, process_rank, redact_secrets
from gem.run_checks import check_accelerator, check_learning_rate, check_setting_types
from gem.run_folder import open_run, redacted_argv, requested_checkpoint, run_identity

log = logging.getLogger(__name__)



def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def build_logger(cfg: DictConfig, run_dir: Path):
    """Instantiate the configured Lightning logger; wandb is offline unless the user opts in."""
    if cfg.logger is None or cfg.logger.get("_target_") is None:
        return False
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    if logger_cfg["_target_"].endswith("WandbLogger"):
        # Decide per run and pass it to the logger; the process environment is left alone so
        # one job of a multirun cannot switch the next ones online.
        online = os.environ.get("WANDB_MODE") == "online" or not logger_cfg.get("offline", True)
        logger_cfg["offline"] = not online
        os.environ.setdefault("WANDB_SILENT", "true")
        if online and not _wandb_key_available():
            raise RuntimeError("wandb is set online (logger.offline=false or WANDB_MODE=online) but no API key "
                               "is configured: run `wandb login` or set WANDB_API_KEY, or stay offline "
                               "(the default) and `wandb sync` the run folder later")
        Path(logger_cfg["save_dir"]).mkdir(parents=True, exist_ok=True)
        for key in ("name", "tags", "notes", "group", "job_type"):  # what wandb stores and shows: no secrets
            if key in logger_cfg:
                logger_cfg[key] = redact_secrets(logger_cfg[key], key)
        logger = hydra.utils.instantiate(logger_cfg)
        with redacted_argv():  # wandb.init stores the command line (its `args`); start it now, redacted
            logger.experiment
        return logger
    return hydra.utils.instantiate(logger_cfg)


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _finish_wandb() -> None:
    """Close the wandb run so the next job of a multirun starts its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; return the finished record's data."""
    run_dir = run_dir_of(cfg)
    started = time.perf_counter()
    # lock, folder checks, _preflight, then the record; it ends completed, failed or terminated
    with open_run(cfg, run_dir, _preflight) as (record, checked):
        try:
            summary = _run(cfg, run_dir, record, checked)
        finally:
            _finish_wandb()
        record.data["time_s"]["total"] = round(time.perf_counter() - started, 3)
    if process_rank() == 0:
        log.info(summary)
        if not logging.getLogger().handlers:  # under Hydra the log line already reaches the console
            print(summary)
    return record.data


@dataclass
class _Checked:
    """What `_preflight` settled: the resolved config, the method (built, so its options are checked)."""

    config: dict
    method: Any
    eval_order: str


def _preflight(cfg: DictConfig) -> _Checked:
    """Every check that needs no data or model, before the run writes or removes anything."""
    load_extensions(cfg.get("extensions"))  # first: a registered resolver or rule may be used below
    check_setting_types(cfg)  # so `optim.lr=abc` fails at once, naming the key
    config = OmegaConf.to_container(cfg, resolve=True)  # lr_grids[method][lr_index] and the like
    check_accelerator(cfg)
    eval_order = check_eval_order(str(cfg.get("eval_order") or "dataset"))
    method = method_from_config(cfg)
    check_learning_rate(cfg, method.trains)  # a zero or negative LR, before the model loads
    return _Checked(config=config, method=method, eval_order=eval_order)


def _resume_checkpoint_callback(cfg: DictConfig, run_dir: Path):
    settings = cfg.get("resume_checkpoints") or {}
    if not settings.get("save_last", False):
        return None
    return ResumeCheckpoint(run_dir / "lightning" / "last.ckpt", settings.get("every_n_train_steps"),
                            identity=run_identity(cfg))  # what a resume from it must repeat


def _resolve_ckpt_path(cfg: DictConfig, run_dir: Path, record: RunRecord) -> str | None:
    """`ckpt_path=last` means this run folder's own last checkpoint (`check_run_folder` made
    sure it exists, is intact and is this run's before the run started)."""
    requested = cfg.get("ckpt_path")
    if not requested:
        return None
    path = requested_checkpoint(str(requested), run_dir)  # checked to exist
    record.update(resumed_from=str(path))
    return str(path)


def method_callbacks(method, datamodule, **context) -> list:
    """The Lightning callbacks a method needs: GEM and its ablations select their entries with data."""
    if getattr(method, "selects_entries", False):
        return [SparseSelection(method, datamodule, **context)]
    return []


def _run(cfg: DictConfig, run_dir: Path, record: RunRecord, checked: _Checked) -> str:
    """config -> task -> model -> method -> trainer -> fit/test -> record; returns the summary line."""
    L.seed_everything(int(cfg.seed), workers=True)
    logger = build_logger(cfg, run_dir)  # first: a logger misconfiguration fails before any loading
    method = checked.method
    with record.phase("load"):
        task = load_task(cfg.task, cfg.data_dir, int(cfg.seed))
        loaded = load_model(cfg.model, task.kind, task.num_labels)
        model = method.prepare(loaded.model, loaded.head_parameter_names)
    max_length = _max_length(cfg, loaded, task, record, method)
    module, collate = _lightning_module(cfg, loaded, task, model, method, max_length)
    datamodule = TaskDataModule(task, collate, batch_size=int(cfg.batch_size), eval_batch_size=int(cfg.eval_batch_size),
                                seed=int(cfg.seed), num_workers=int(cfg.num_workers),
                                eval_order=checked.eval_order)
    ckpt_path = _resolve_ckpt_path(cfg, run_dir, record)
    callbacks = method_callbacks(method, datamodule, record=record, run_dir=run_dir, seed=int(cfg.seed),
                                 resume_from=ckpt_path)
    resume_checkpoint = _resume_checkpoint_callback(cfg, run_dir)
    callbacks += [resume_checkpoint] if resume_checkpoint else []
    callbacks.append(EpochSummary())  # a line per epoch: dev metrics, time, time left
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=logger, callbacks=callbacks,
                                                 enable_checkpointing=False)  # ours: ResumeCheckpoint
    if trainer.logger:
        # The resolved config (secrets removed), so wandb filters like config.task.name work.
        trainer.logger.log_hyperparams(record.data["config"])

    if method.trains:
        with record.phase("fit"):
            # weights_only: a checkpoint is data, never code, whatever torch's default says
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        module.restore_best()
    else:  # zero_shot: dev scored once (the record's and the table's dev column), nothing trained
        with record.phase("fit"):
            trainer.validate(module, datamodule=datamodule, verbose=False)
    with record.phase("test"):
        trainer.test(module, datamodule=datamodule, verbose=False)
    if resume_checkpoint and not cfg.resume_checkpoints.get("keep_after_success", False):
        shutil.rmtree(run_dir / "lightning", ignore_errors=True)
    return _record_results(cfg, run_dir, record, trainer, module, method, loaded.num_parameters, task)


def _max_length(cfg: DictConfig, loaded, task, record: RunRecord, method) -> int:
    """The sequence length, clamped to the model's positions; the data notes go into the record."""
    requested = int(cfg.model.get("max_length") or cfg.task.max_length) if loaded.kind == "decoder" \
        else int(cfg.task.max_length)
    max_length, clamp_note = fit_max_length(requested, loaded.model, loaded.tokenizer)
    notes = [*task.notes, *([clamp_note] if clamp_note else [])]
    if not task.split_sizes.get("dev"):
        notes.append("no dev set (task.num_dev=0): no best-epoch selection, the last epoch is tested")
        log.warning(notes[-1])
    record.update(data={"source": task.source, "sizes": task.split_sizes, "notes": notes},
                  method_settings=method.describe())
    if clamp_note:  # the data layer logs its own notes when it makes them
        log.warning(clamp_note)
    return max_length


def _lightning_module(cfg: DictConfig, loaded, task, model, method, max_length: int):
    """(LightningModule, collator): prompts + candidate scoring / generation for decoders, a task head otherwise."""
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if loaded.kind == "decoder":  # gem.lit.causal_module
        generation = OmegaConf.to_container(cfg.task.generation, resolve=True) if cfg.task.get("generation") else {}
        collate = causal_collator(loaded.tokenizer, task, max_length, int(generation.get("max_new_tokens", 0)))
        module = CausalLMModule(model, method, task_name=task.name, task_kind=task.kind,
                                metric_names=list(task.metrics), num_labels=task.num_labels, optim=optim,
                                tokenizer=loaded.tokenizer, generation=generation)
        return module, collate
    collate = encoder_collator(loaded.tokenizer, task, max_length)
    module = FineTuneModule(model, method, task_kind=task.kind, metric_names=list(task.metrics),
                            num_labels=task.num_labels, optim=optim)
    return module, collate


def _record_results(cfg: DictConfig, run_dir: Path, record: RunRecord, trainer: L.Trainer, module, method,
                    total: int, task) -> str:
    """Metrics, counts and the saved checkpoint into the record (and the logger); the summary line."""
    model = module.model  # the selection may have wrapped it (GEM: a PEFT model)
    tuned = method.tuned_count(model)
    params = {"total": total, "trainable": sum(p.numel() for _, p in method.trainable_parameters(model)),
              "tuned": tuned, "head": method.head_count(model), "tuned_pct": 100.0 * tuned / total}
    metrics = {**module.best_dev, **module.test_results}
    record.update(metrics=metrics, params=params, best_epoch=module.best_epoch, history=module.history,
                  train_steps=int(trainer.global_step))  # optimizer steps over the whole fit
    if cfg.save_checkpoint:
        with record.phase("save"):
            checkpoint = method.save(model, run_dir / "checkpoint",
                                     extra_config={"base_model": cfg.model.pretrained, "task": task.name})
            apply_umask(checkpoint)  # safetensors writes 0600 files
        record.data["checkpoint"] = str(checkpoint)
    if trainer.logger:
        trainer.logger.log_metrics({f"final/{k}": v for k, v in metrics.items()})
        trainer.logger.log_hyperparams({"params": params})
        if hasattr(trainer.logger, "experiment") and hasattr(trainer.logger.experiment, "summary"):
            trainer.logger.experiment.summary.update({**metrics, **{f"params/{k}": v for k, v in params.items()}})
        # The trainer already finalized its logger; buffering loggers (CSV) must flush these final rows.
        trainer.logger.save()
    main = f"test/{task.main_metric}"
    record.data["main_metric"] = main
    return (f"[{method.name}] {task.name} | {cfg.model.name} | seed {cfg.seed} | "
            f"{main}={metrics.get(main, float('nan')):.4f} (best dev epoch {module.best_epoch}) | "
            f"tuned {tuned:,} = {params['tuned_pct']:.4f}% of {total:,} | run folder {run_dir} "
            f"(record: {record.path})")
