"""Score a finished run's checkpoint again: on another split, or on another task with the same labels.

    python -m gem.evaluate RUN_DIR                               # its test set again (reproduces test/*)
    python -m gem.evaluate RUN_DIR --split dev                   # its dev set (reproduces the best epoch's dev/*)
    python -m gem.evaluate RUN_DIR --task rte --data-dir ../shared/data      # another task, same label set
    python -m gem.evaluate RUN_DIR --task my_task.yaml task.num_test=200     # a task config file; task.* overrides

The model is rebuilt as `gem.export` rebuilds it: base model and method from the run's record
(`results.json`, status `completed`), what trained from `RUN_DIR/checkpoint`. The same rules as a
resume hold:

* trust: the model loads with the record's own model settings (its `trust_remote_code`
  included; nothing on this command line can switch it on), and the checkpoint is read from
  safetensors and JSON only (no pickle);
* identity: the checkpoint must be the record's: the method, base model and task written in
  `checkpoint/method_config.json` must be the record's, or the evaluation is refused;
* another task must be of the same kind with the same labels in the same order (the trained
  head's outputs mean those labels); otherwise it is refused, naming both label sets.

The run's own task is sampled with the record's settings and seed, so `--split test` and
`--split dev` score the very examples the run scored. The result goes to
`RUN_DIR/evaluations/<task>_<split>/evaluation.json` (and is printed); the run's record is not changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gem.records import RECORD_NAME, package_versions, read_record, write_json_atomically

log = logging.getLogger(__name__)

SPLITS = ("test", "dev")


class EvaluationError(ValueError):
    """The evaluation must not run as asked: the message says why and what to do."""


def check_checkpoint_identity(run_dir: Path, record: dict) -> dict:
    """The checkpoint's own description must match the record's method, base model and task."""
    path = run_dir / "checkpoint" / "method_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path}: cannot read the checkpoint's description ({error}); the checkpoint is "
                              f"incomplete: rerun the run with save_checkpoint=true") from error
    config = record.get("config") or {}
    expected = {"method": record.get("method"),
                "base_model": (config.get("model") or {}).get("pretrained"),
                "task": record.get("task")}
    found = {"method": saved.get("method", saved.get("name")), "base_model": saved.get("base_model"),
             "task": saved.get("task")}
    differ = [f"{key}: record {expected[key]!r}, checkpoint {found[key]!r}" for key in expected
              if found[key] is not None and expected[key] is not None and found[key] != expected[key]]
    if differ:
        raise EvaluationError(f"{run_dir}: the checkpoint is not this record's ({'; '.join(differ)}); was "
                              f"checkpoint/ copied from another run? Evaluate the run folder the checkpoint came from")
    return saved


def task_config(record: dict, task: str | None, overrides: list[str]) -> tuple[DictConfig, bool]:
    """(the task config to score, whether it is the run's own task)."""
    own = OmegaConf.create(record["config"]["task"])
    if task is None or task == own.name:
        cfg, same = own, True
    else:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise EvaluationError(f"--task {task}: no such file")
            cfg = OmegaConf.load(path)
        else:
            from gem.data.tasks import DataError, load_task_config

            try:
                cfg = load_task_config(task)
            except DataError as error:
                raise EvaluationError(f"--task {task}: {error}; or pass the path of a task yaml") from error
        same = False
        if cfg.get("kind") != own.get("kind") or [str(x) for x in cfg.get("label_names") or []] != \
                [str(x) for x in own.get("label_names") or []]:
            raise EvaluationError(
                f"task {cfg.get('name')!r} ({cfg.get('kind')}, labels {list(cfg.get('label_names') or [])}) does not "
                f"share the run's label set (task {own.name!r}: {own.get('kind')}, labels "
                f"{list(own.get('label_names') or [])}); the trained head's outputs mean the run's labels, in that order")
    for item in overrides:
        key, _, _ = item.partition("=")
        if not key.startswith("task.") or "=" not in item:
            raise EvaluationError(f"{item!r}: only task settings can be overridden here (task.<key>=<value>, "
                                  f"e.g. task.num_test=200)")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o[len("task."):] for o in overrides]))
    return cfg, same


def evaluate_run(run_dir: str | Path, split: str = "test", task: str | None = None, data_dir: str | None = None,
                 overrides: list[str] | None = None, accelerator: str = "auto", write: bool = True) -> dict:
    """Score the run's checkpoint; return the evaluation (metrics, data, checkpoint, times)."""
    import lightning as L

    from gem.data import encoder_collator, load_task
    from gem.data.causal_collate import causal_collator
    from gem.export import load_trained
    from gem.lit.causal_module import CausalLMModule
    from gem.lit.datamodule import TaskDataModule, check_eval_order
    from gem.lit.module import FineTuneModule
    from gem.models import fit_max_length

    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise EvaluationError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    try:
        record = read_record(run_dir / RECORD_NAME)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{run_dir / RECORD_NAME}: cannot read the run record ({error})") from error
    if record.get("status") != "completed":
        raise EvaluationError(f"{run_dir} holds a run with status {record.get('status')!r}; only completed runs "
                              f"are evaluated (a killed run resumes with ckpt_path=last)")
    check_checkpoint_identity(run_dir, record)
    task_cfg, same_task = task_config(record, task, list(overrides or []))
    config = OmegaConf.create(record["config"])
    started = time.perf_counter()
    L.seed_everything(int(config.seed), workers=True, verbose=False)
    data = load_task(task_cfg, data_dir if data_dir is not None else config.get("data_dir"), int(config.seed))
    if split == "dev" and not data.dev:
        raise EvaluationError(f"task {data.name} has no dev set here (task.num_dev=0); use --split test")
    model, tokenizer, method, _ = load_trained(run_dir)
    loaded_kind = str(config.model.get("kind") or "encoder")
    if loaded_kind == "decoder":
        requested = int(config.model.get("max_length") or task_cfg.max_length)
    else:
        requested = int(task_cfg.max_length)
    max_length, clamp_note = fit_max_length(requested, model, tokenizer)
    if clamp_note:
        log.warning(clamp_note)
    if loaded_kind == "decoder":
        generation = OmegaConf.to_container(task_cfg.generation, resolve=True) if task_cfg.get("generation") else {}
        collate = causal_collator(tokenizer, data, max_length, int(generation.get("max_new_tokens", 0)))
        module = CausalLMModule(model, method, task_name=data.name, task_kind=data.kind,
                                metric_names=list(data.metrics), num_labels=data.num_labels, optim={},
                                tokenizer=tokenizer, generation=generation)
    else:
        collate = encoder_collator(tokenizer, data, max_length)
        module = FineTuneModule(model, method, task_kind=data.kind, metric_names=list(data.metrics),
                                num_labels=data.num_labels, optim={})
    eval_order = check_eval_order(str(config.get("eval_order") or "dataset"))
    datamodule = TaskDataModule(data, collate, batch_size=int(config.batch_size),
                                eval_batch_size=int(config.eval_batch_size), seed=int(config.seed), num_workers=0,
                                eval_order=eval_order)
    out_dir = run_dir / "evaluations" / f"{data.name}_{split}"
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=str(out_dir) if write else None)
    if split == "test":
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics = dict(module.test_results)
    else:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = dict(module.history[-1]) if module.history else {}
        metrics.pop("epoch", None)
    result: dict[str, Any] = {
        "run_dir": str(run_dir), "run": {k: record.get(k) for k in ("method", "task", "model", "seed")},
        "task": data.name, "same_task": same_task, "split": split, "metrics": metrics,
        "main_metric": f"{split}/{data.main_metric}",
        "data": {"source": data.source, "sizes": data.split_sizes, "notes": data.notes},
        "checkpoint": str(run_dir / "checkpoint"), "time_s": round(time.perf_counter() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": package_versions(),
    }
    if write:
        result["path"] = str(write_json_atomically(out_dir / "evaluation.json", result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gem.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a completed run's folder (results.json and checkpoint/)")
    parser.add_argument("overrides", nargs="*", help="task settings, task.<key>=<value> (e.g. task.num_test=200)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="the split to score (default: test)")
    parser.add_argument("--task", default=None, help="another task with the run's label set: a name from "
                        "conf/task/ or a task yaml (default: the run's own task, sampled as the run sampled it)")
    parser.add_argument("--data-dir", default=None, help="the data folder (default: the run's data_dir, else "
                        "GEM_DATA_DIR, else the Hub)")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no evaluation.json")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    from gem.console import tidy_console

    tidy_console()
    from gem.data.tasks import DataError
    from gem.methods import MethodError
    from gem.models import ModelLoadError

    try:
        result = evaluate_run(args.run_dir, split=args.split, task=args.task, data_dir=args.data_dir,
                              overrides=args.overrides, accelerator=args.accelerator, write=not args.no_write)
    except (OSError, ValueError, MethodError, ModelLoadError, DataError) as error:
        parser.error(str(error))
    metrics = " ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items() if isinstance(v, (int, float)))
    where = f" | {result['path']}" if "path" in result else ""
    print(f"[{result['run']['method']}] evaluated {result['run_dir']} on {result['task']} {result['split']} "
          f"({result['data']['sizes'][result['split']]} examples): {metrics}{where}")


if __name__ == "__main__":
    main()
