"""The table command: run records in, a paper-style table out.

    gem-tables outputs/ multirun/ results/runs                    # Markdown to stdout
    gem-tables results/ --select-by dev --format latex -o table.tex
    gem-tables results/ --group-by config.method.density --metric dev/acc --format csv
    gem-tables --wandb-project ENTITY/PROJECT --wandb-filter '{"config.task.name": "rte"}'

Rows are methods (full, lora, adapter, bitfit, gem, then the ablations alphabetically),
columns are tasks, a cell is `mean ± std (n)` over seeds of the metric ×100 (each task's
main test metric unless `--metric` says otherwise). Each row carries the tuned share of
the model's parameters and the average over its tasks; the best cell of each task column
(within a model) is bold. Runs that did not complete are left out and listed in a footer.

With `--select-by dev`, each (model, task, method) cell first picks the setting of the
sweep keys (default: the learning rate, `config.optim.lr`) with the best mean dev score
of the task's main metric and then reports that setting's test scores (all its seeds): the
paper's protocol of choosing the LR on dev. Settings are compared on the seeds they share,
so a two-stage grid (every LR on seed 1, then more seeds at the seed-1 winner) is judged
on seed 1 until the other LRs get the same seeds. `--format overrides` prints each cell's
chosen setting as Hydra overrides, the input of that second stage.

Everything is sorted and every number is formatted with a fixed precision, so the same
records always print the same bytes.

The pure pieces: `load_records(paths)`, `load_wandb_records(project, filters)`,
`records_to_frame(records)`, `build_table(records, ...) -> Table`, `render(table, fmt)`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from gem.records import find_records, path_sort_key, read_record

METHOD_ORDER = ("zero_shot", "full", "lora", "adapter", "bitfit", "gem")
METHOD_LABELS = {"zero_shot": "Zero-shot", "full": "Full FT", "lora": "LoRA", "adapter": "Adapter", "bitfit": "BitFit", "gem": "GEM"}
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qnli", "rte", "boolq", "cb", "copa", "multirc", "wic",
              "squad", "gsm8k", "mbpp")
TASK_LABELS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qnli": "QNLI", "rte": "RTE",
               "boolq": "BoolQ", "cb": "CB", "copa": "COPA", "multirc": "MultiRC", "wic": "WiC",
               "squad": "SQuAD", "gsm8k": "GSM8k", "mbpp": "MBPP"}
DEFAULT_SWEEP_KEYS = ("config.optim.lr",)
# Settings that change what a number means: a cell pooling runs that differ in one of them
# (and neither groups nor sweeps over it) gets a warning under the table.
POOLING_CHECK_KEYS = ("config.method.density", "config.method.score", "config.method.budget",
                      "config.extensions", "config.task.num_train", "config.trainer.max_epochs",
                      "config.batch_size", "config.task.max_length")
KEY_ALIASES = {"lr": "config.optim.lr", "density": "config.method.density", "seed": "seed"}
FORMATS = ("md", "latex", "csv", "overrides")
_SCALE = 100.0
_MISSING = {"md": "–", "latex": "--"}
_WANDB_STATES = {"finished": "completed", "failed": "failed", "crashed": "failed", "killed": "failed",
                 "running": "running", "pending": "running", "preempted": "failed"}


# ----------------------------------------------------------------------------- records

def load_records(paths: Iterable[str | Path]) -> list[dict]:
    """Every `results.json` under `paths` (folders or record files), each with `_path` added.

    A path is kept as it was found below the given root (relative roots give relative paths),
    so the footer of the table does not depend on the working directory's absolute location.
    A record that cannot be parsed comes back as `{"status": "unreadable", ...}` and is counted
    with the other left-out runs. A record found twice (overlapping roots) is read once.
    """
    records: list[dict] = []
    seen: set[Path] = set()
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"no such record folder or file: {root}")
        for path in find_records(root):
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            try:
                record = read_record(path)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as error:
                record = {"status": "unreadable", "error": f"{type(error).__name__}: {error}"}
            record["_path"] = str(path)
            records.append(record)
    return sorted(records, key=lambda r: path_sort_key(r["_path"]))


def load_wandb_records(project: str, filters: dict | None = None, api: Any = None) -> list[dict]:
    """Runs of a wandb project (`ENTITY/PROJECT`) as records of the same form as `results.json`.

    `filters` is wandb's MongoDB-style run filter, e.g. `{"config.task.name": "rte"}`.
    """
    if api is None:
        import wandb  # lazily: reading local records must not need wandb's import time

        api = wandb.Api()
    runs = api.runs(project, filters=filters or {})
    return sorted((wandb_run_to_record(run, project) for run in runs), key=lambda r: path_sort_key(r["_path"]))


_RUN_NAME = re.compile(r"^(?P<task>[^-]+)-(?P<method>[^-]+)-(?P<model>.+)-s(?P<seed>\d+)$")


def wandb_run_to_record(run: Any, project: str = "") -> dict:
    """One wandb run (public API object) as a flat-enough record: status, method, task, model,
    seed, metrics (`dev/*`, `test/*` of the summary), params, main_metric, config."""
    config = _plain(getattr(run, "config", None) or {})
    # the raw form of a run's config keeps each top-level value as {"value": ..., "desc": ...}
    config = _unflatten({k: v["value"] if isinstance(v, dict) and set(v) in ({"value"}, {"value", "desc"}) else v
                         for k, v in config.items() if not str(k).startswith("_")})
    summary = getattr(run, "summary_metrics", None)
    if summary is None:
        summary = getattr(run, "summary", None) or {}
    summary = _plain(summary)
    metrics: dict[str, float] = {}
    for key, value in summary.items():
        name = key[len("final/"):] if key.startswith("final/") else key
        if name.startswith(("dev/", "test/")) and not name.startswith("dev/best_") and _is_number(value):
            if key.startswith("final/") or name not in metrics:
                metrics[name] = float(value)
    params = {k[len("params/"):]: v for k, v in summary.items() if k.startswith("params/")}
    if not params and isinstance(config.get("params"), dict):
        params = dict(config["params"])

    def name_of(section: str) -> Any:
        value = config.get(section)
        return value.get("name") if isinstance(value, dict) else value

    parsed = _RUN_NAME.match(str(getattr(run, "name", "") or ""))
    guess = parsed.groupdict() if parsed else {}
    seed = config.get("seed", guess.get("seed"))
    task_metrics = (config.get("task") or {}).get("metrics") if isinstance(config.get("task"), dict) else None
    run_path = getattr(run, "path", None)
    if isinstance(run_path, (list, tuple)):
        run_id = "/".join(map(str, run_path))
    else:
        run_id = f"{project}/{getattr(run, 'id', '?')}"
    return {
        "status": _WANDB_STATES.get(str(getattr(run, "state", "")).lower(), str(getattr(run, "state", "unknown"))),
        "method": name_of("method") or guess.get("method"),
        "task": name_of("task") or guess.get("task"),
        "model": name_of("model") or guess.get("model"),
        "seed": int(seed) if seed is not None and str(seed).lstrip("-").isdigit() else seed,
        "metrics": metrics,
        "main_metric": f"test/{task_metrics[0]}" if task_metrics else None,
        "params": params,
        "config": config,
        "_path": f"wandb:{run_id}",
    }


def _plain(value: Any) -> Any:
    """wandb's summary/config wrappers and their `{"value": ...}` config entries as plain data."""
    if hasattr(value, "_json_dict"):
        value = value._json_dict
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in dict(value.items()).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _unflatten(config: dict) -> dict:
    """`{"optim.lr": x}` or `{"optim/lr": x}` (how some loggers flatten) as `{"optim": {"lr": x}}`."""
    out: dict = {}
    for key in sorted(config, key=lambda k: (k.count(".") + k.count("/"), k)):
        value = config[key]
        parts = re.split(r"[./]", key) if not key.startswith("_") else [key]
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out


def lookup(record: dict, key: str, default: Any = None) -> Any:
    """A dotted key into a nested record: `config.optim.lr`, `params.tuned_pct`,
    `metrics.test/acc`; keys that themselves contain dots are found too. `lr` and `density`
    are short for `config.optim.lr` and `config.method.density`."""
    key = KEY_ALIASES.get(key, key)
    found = _lookup(record, key)
    if found is _NOTHING and not key.startswith("config."):
        found = _lookup(record, "config." + key)
    return default if found is _NOTHING else found


_NOTHING = object()


def _lookup(node: Any, key: str) -> Any:
    if not isinstance(node, dict):
        return _NOTHING
    if key in node:
        return node[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in node:
            found = _lookup(node[head], ".".join(parts[i:]))
            if found is not _NOTHING:
                return found
    return _NOTHING


def flatten(record: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys (lists stay values)."""
    flat: dict = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_FRAME_HEAD = ("_path", "status", "model", "task", "method", "seed", "main_metric")


def records_to_frame(records: Sequence[dict], drop: Sequence[str] = ("history", "versions", "host")):
    """A pandas DataFrame, one row per record, columns the flattened keys (`config.optim.lr`,
    `metrics.test/acc`, `params.tuned_pct`, ...), plus `main_value` (the main metric's value)."""
    import pandas as pd

    rows = []
    for record in sorted(records, key=lambda r: path_sort_key(str(r.get("_path", "")))):
        flat = flatten({k: v for k, v in record.items() if k not in drop})
        main = _main_metric(record)
        flat["main_value"] = (record.get("metrics") or {}).get(main) if main else None
        rows.append(flat)
    frame = pd.DataFrame(rows)
    head = [c for c in _FRAME_HEAD if c in frame.columns]
    return frame[head + sorted(c for c in frame.columns if c not in head)]


# ----------------------------------------------------------------------------- the table

@dataclass
class Cell:
    """One (row, task) entry: statistics in display units (metric ×100)."""

    mean: float
    std: float | None          # sample std (ddof 1); None with a single seed
    n: int
    values: tuple[float, ...] = ()
    selected: dict[str, str] | None = None   # the sweep setting chosen on dev
    dev_mean: float | None = None            # that setting's mean dev score (×100)
    candidates: int = 1                      # how many settings there were to choose from


@dataclass
class Row:
    model: str
    method: str
    group: tuple[str, ...]                   # the values of `group_by`, formatted
    group_values: tuple[Any, ...]            # the same, raw
    cells: dict[str, Cell] = field(default_factory=dict)
    tuned_pct: float | None = None
    average: float | None = None             # mean over the table's tasks; None if a task is missing


@dataclass
class Table:
    rows: list[Row]
    tasks: list[str]
    metric: str | None                       # None: each task's main test metric
    main_metrics: dict[str, str]             # task -> the metric used for its column
    group_by: tuple[str, ...]
    select_by: str | None
    sweep_keys: tuple[str, ...]
    best: set[tuple[int, str]]               # (row index, task); task "avg" for the average column
    notes: list[str]                         # footer lines
    digits: int = 1
    left_out: dict[str, list[str]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return sorted({row.model for row in self.rows})


def method_sort_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), str(method))


def task_sort_key(task: str) -> tuple:
    return (TASK_ORDER.index(task), "") if task in TASK_ORDER else (len(TASK_ORDER), str(task))


def _value_sort_key(value: Any) -> tuple:
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, bool):
        return (1, 0.0, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def format_value(value: Any) -> str:
    """A config value as a stable string: floats as their shortest repr, lists as JSON."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _main_metric(record: dict) -> str | None:
    main = record.get("main_metric")
    if main:
        return str(main)
    task_metrics = lookup(record, "config.task.metrics")
    if isinstance(task_metrics, list) and task_metrics:
        return f"test/{task_metrics[0]}"
    tests = sorted(k for k in (record.get("metrics") or {}) if k.startswith("test/"))
    return tests[0] if tests else None


def _metric_key(record: dict, metric: str | None) -> str | None:
    """`None`/`test`/`dev`: the task's main metric on that split; anything else as given."""
    main = _main_metric(record)
    if metric in (None, "test", "dev"):
        if main is None:
            return None
        return main if metric in (None, "test") else "dev/" + main.split("/", 1)[-1]
    return metric if "/" in metric else f"test/{metric}"


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = _mean(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class _Entry:
    """One completed run in a cell: its score and dev score (×100) and what it was run with."""

    value: float
    dev: float | None
    seed: Any
    sweep: tuple[str, ...]              # the values of the sweep keys, formatted
    path: str
    settings: tuple[str, ...] = ()      # the values of the pooling check keys, formatted


@dataclass
class _Grouped:
    """The completed records the table shows, by row and task, and the records it leaves out."""

    # a row key is (model, method, the formatted group_by values)
    cells: dict[tuple, dict[str, list[_Entry]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    group_values: dict[tuple, tuple] = field(default_factory=dict)          # row key -> the raw group_by values
    tuned_pct: dict[tuple, list[float]] = field(default_factory=lambda: defaultdict(list))  # row key -> its runs'
    main_metrics: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # task -> metrics read
    left_out: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))    # status -> paths
    missing_metric: list[str] = field(default_factory=list)                # completed, but without the metric


@dataclass
class _Notes:
    """What the footer reports about the cells, one list per kind, filled while the cells are built."""

    selections: list[str] = field(default_factory=list)   # per row: each task's setting chosen on dev
    at_edge: list[str] = field(default_factory=list)      # chose an end of a numeric sweep
    no_dev: list[str] = field(default_factory=list)       # a choice to make but no dev score to make it by
    unshared: list[str] = field(default_factory=list)     # settings that share no seed
    mixed: list[str] = field(default_factory=list)        # pool sweep settings (no dev selection)
    repeated: list[str] = field(default_factory=list)     # count a seed more than once
    differing: list[str] = field(default_factory=list)    # pool runs that differ in a pooling check key


def build_table(records: Sequence[dict], *, metric: str | None = None, group_by: Sequence[str] = (),
                select_by: str | None = None, sweep_keys: Sequence[str] = DEFAULT_SWEEP_KEYS,
                tasks: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                models: Sequence[str] | None = None, digits: int = 1) -> Table:
    """Group completed records by (model, method, *group_by) rows and task columns.

    `metric`: None (each task's main test metric), `dev`/`test` (the main metric on that
    split) or a metric key such as `dev/acc`. `select_by="dev"`: within each cell, keep only
    the `sweep_keys` setting with the best mean dev main metric. `tasks`/`methods`/`models`
    restrict (and for tasks, order) what is shown.
    """
    if select_by not in (None, "dev"):
        raise ValueError(f"select_by must be None or 'dev', not {select_by!r}")
    group_by = tuple(KEY_ALIASES.get(k, k) for k in group_by)
    sweep_keys = tuple(k for k in (KEY_ALIASES.get(k, k) for k in sweep_keys) if k not in group_by)
    check_keys = tuple(k for k in POOLING_CHECK_KEYS if k not in group_by and k not in sweep_keys)
    grouped = _collect_entries(records, metric=metric, group_by=group_by, sweep_keys=sweep_keys,
                               check_keys=check_keys, tasks=tasks, methods=methods, models=models)
    shown_tasks = list(tasks) if tasks else sorted({t for c in grouped.cells.values() for t in c}, key=task_sort_key)
    # rows by model, then method order, then the raw group values (numbers as numbers)
    ordered = sorted(grouped.cells, key=lambda k: (k[0], method_sort_key(k[1]),
                                                   tuple(_value_sort_key(v) for v in grouped.group_values[k]), k[2]))
    notes = _Notes()
    rows = [_build_row(row_key, grouped, shown_tasks, select_by=select_by, sweep_keys=sweep_keys,
                       check_keys=check_keys, notes=notes) for row_key in ordered]
    # the caption names each column's metric, "mixed" when its runs were read by different ones
    used = {t: sorted(grouped.main_metrics[t])[0] if len(grouped.main_metrics[t]) == 1 else "mixed"
            for t in shown_tasks if grouped.main_metrics.get(t)}
    return Table(rows=rows, tasks=shown_tasks, metric=metric, main_metrics=used, group_by=group_by,
                 select_by=select_by, sweep_keys=sweep_keys, best=_mark_best(rows, shown_tasks, digits),
                 notes=_table_notes(grouped, notes, metric=metric, sweep_keys=sweep_keys), digits=digits,
                 left_out={k: sorted(v) for k, v in sorted(grouped.left_out.items())})


def _collect_entries(records: Sequence[dict], *, metric: str | None, group_by: tuple[str, ...],
                     sweep_keys: tuple[str, ...], check_keys: tuple[str, ...], tasks: Sequence[str] | None,
                     methods: Sequence[str] | None, models: Sequence[str] | None) -> _Grouped:
    """Each completed record of a shown model, task and method as an `_Entry` of its cell, in path
    order; the others are counted as left out (by status) or as missing the metric."""
    grouped = _Grouped()
    for record in sorted(records, key=lambda r: path_sort_key(str(r.get("_path", "")))):
        path = str(record.get("_path", "?"))
        status = str(record.get("status", "unknown"))
        if status != "completed":
            grouped.left_out[status].append(path)
            continue
        model, task, method = (str(record.get(k)) for k in ("model", "task", "method"))
        if (tasks and task not in tasks) or (methods and method not in methods) or (models and model not in models):
            continue
        key = _metric_key(record, metric)
        value = (record.get("metrics") or {}).get(key) if key else None
        if not _is_number(value):
            grouped.missing_metric.append(path)
            continue
        dev_key = _metric_key(record, "dev")
        dev = (record.get("metrics") or {}).get(dev_key) if dev_key else None
        raw_group = tuple(lookup(record, k) for k in group_by)
        row_key = (model, method, tuple(format_value(v) for v in raw_group))
        grouped.group_values[row_key] = raw_group
        sweep = tuple(format_value(lookup(record, k)) for k in sweep_keys)
        settings = tuple(format_value(lookup(record, k)) for k in check_keys)
        grouped.cells[row_key][task].append(_Entry(float(value) * _SCALE,
                                                   float(dev) * _SCALE if _is_number(dev) else None,
                                                   record.get("seed"), sweep, path, settings))
        grouped.main_metrics[task].add(key)
        pct = lookup(record, "params.tuned_pct")
        if _is_number(pct):
            grouped.tuned_pct[row_key].append(float(pct))
    return grouped


def _build_row(row_key: tuple, grouped: _Grouped, tasks: list[str], *, select_by: str | None,
               sweep_keys: tuple[str, ...], check_keys: tuple[str, ...], notes: _Notes) -> Row:
    """One row: a cell per task with runs, the tuned share, and the average when no task is missing."""
    model, method, group = row_key
    tuned = grouped.tuned_pct[row_key]
    row = Row(model, method, group, grouped.group_values[row_key], tuned_pct=_mean(tuned) if tuned else None)
    label = "/".join([model, method, *group])
    chosen_settings = []
    for task in tasks:
        entries = grouped.cells[row_key].get(task)
        if not entries:
            continue
        row.cells[task], chosen = _build_cell(entries, f"{label}/{task}", select_by=select_by,
                                              sweep_keys=sweep_keys, check_keys=check_keys, notes=notes)
        if chosen is not None:
            chosen_settings.append(f"{task}={','.join(chosen)}")
    if chosen_settings:
        notes.selections.append(f"{label}: {' '.join(chosen_settings)}")
    if tasks and all(t in row.cells for t in tasks):
        row.average = _mean([row.cells[t].mean for t in tasks])
    return row


def _build_cell(entries: list[_Entry], where: str, *, select_by: str | None, sweep_keys: tuple[str, ...],
                check_keys: tuple[str, ...], notes: _Notes) -> tuple[Cell, tuple[str, ...] | None]:
    """A cell's statistics over its runs (with a dev selection, over the chosen setting's runs) and
    the chosen setting (None without a selection); what the footer should say goes into `notes`."""
    settings: dict[tuple, list[_Entry]] = defaultdict(list)
    for entry in entries:
        settings[entry.sweep].append(entry)
    chosen = selected = dev_mean = None
    if select_by == "dev" and sweep_keys:
        chosen, entries, unshared, no_dev = _choose_setting(settings)
        if unshared:
            notes.unshared.append(where)
        if no_dev:
            notes.no_dev.append(where)
        selected = dict(zip(sweep_keys, chosen))
        edge = _grid_edge(list(settings), chosen)
        if edge:
            notes.at_edge.append(f"{where} ({sweep_keys[0]}={chosen[0]}, the {edge} of {len(settings)})")
        devs = [e.dev for e in entries if e.dev is not None]
        dev_mean = _mean(devs) if devs else None
    elif len(settings) > 1:
        notes.mixed.append(where)
    varied = [k for i, k in enumerate(check_keys) if len({e.settings[i] for e in entries}) > 1]
    if varied:
        notes.differing.append(f"{where} ({', '.join(varied)})")
    seeds = Counter(format_value(e.seed) for e in entries)
    dupes = sorted(s for s, c in seeds.items() if c > 1)
    if dupes:
        notes.repeated.append(f"{where} (seed {', '.join(dupes)})")
    values = tuple(sorted(e.value for e in entries))
    return Cell(_mean(values), _std(values), len(values), values, selected, dev_mean, len(settings)), chosen


def _choose_setting(settings: dict[tuple, list[_Entry]]) -> tuple[tuple[str, ...], list[_Entry], bool, bool]:
    """The sweep setting with the best mean dev score and its runs, then two flags for the footer:
    the settings share no seed (so each was judged on all its seeds), and there was a choice to
    make but no dev score to make it by."""
    # Settings are compared on the seeds they all have, so a setting run on one seed
    # (a seed-1 LR sweep) is not favoured or penalised against one run on three.
    shared = set.intersection(*({format_value(e.seed) for e in runs} for runs in settings.values()))
    # the first best in sorted setting order wins ties: deterministic
    in_order = sorted(settings.items(), key=lambda kv: tuple(_value_sort_key(_number_or_text(v)) for v in kv[0]))
    best_setting, entries = max(in_order, key=lambda kv: _dev_score(kv[1], shared))
    unshared = not shared and len(settings) > 1
    no_dev = len(settings) > 1 and _dev_score(entries, shared)[0] == -math.inf
    return best_setting, entries, unshared, no_dev


def _dev_score(entries: list[_Entry], shared_seeds: set[str]) -> tuple[float, int]:
    """A setting's rank: the mean dev score of its runs on the shared seeds (all its runs when no
    seed is shared; -inf without a dev score), then how many runs it has."""
    devs = [e.dev for e in entries if e.dev is not None
            and (not shared_seeds or format_value(e.seed) in shared_seeds)]
    return (_mean(devs) if devs else -math.inf, len(entries))


def _mark_best(rows: list[Row], tasks: list[str], digits: int) -> set[tuple[int, str]]:
    """(row index, task) of the best cell of each task column within each model, task "avg" for the
    average column; compared as printed (rounded to `digits`), so ties are all bold. A column with
    fewer than two entries in a model has no best."""
    best: set[tuple[int, str]] = set()
    for model in sorted({r.model for r in rows}):
        indices = [i for i, r in enumerate(rows) if r.model == model]
        for task in [*tasks, "avg"]:
            scored = [(i, rows[i].average if task == "avg" else
                       (rows[i].cells[task].mean if task in rows[i].cells else None)) for i in indices]
            scored = [(i, round(v, digits)) for i, v in scored if v is not None]
            if len(scored) > 1:
                top = max(v for _, v in scored)
                best.update((i, task) for i, v in scored if v == top)
    return best


def _table_notes(grouped: _Grouped, notes: _Notes, *, metric: str | None, sweep_keys: tuple[str, ...]) -> list[str]:
    """The footer lines: runs left out, each row's settings chosen on dev, then the notes and
    warnings about cells."""
    lines: list[str] = []
    if grouped.left_out:
        counts = ", ".join(f"{len(grouped.left_out[s])} {s}" for s in sorted(grouped.left_out))
        paths = ", ".join(sorted((p for ps in grouped.left_out.values() for p in ps), key=path_sort_key))
        lines.append(f"left out: {counts}: {paths}")
    if grouped.missing_metric:
        what = metric or "its task's main metric"
        lines.append(f"left out: {len(grouped.missing_metric)} completed without {what}: "
                     f"{', '.join(sorted(grouped.missing_metric))}")
    if notes.selections:
        lines.append(f"selected on dev ({', '.join(sweep_keys)}) per (model, task, method):")
        lines.extend(f"  {line}" for line in notes.selections)
    for level, where, what in (
            ("note", notes.at_edge, "chose the largest or smallest of the swept values, so the best setting may "
                                    "lie beyond the grid"),
            ("warning", notes.no_dev, "have no dev score to choose by (task.num_dev=0?); the setting with the "
                                      "most runs, then the first, is shown"),
            ("warning", notes.unshared, "have settings that share no seed, compared on all their seeds"),
            ("warning", notes.mixed, f"pool runs with different {', '.join(sweep_keys)} (use --select-by dev or "
                                     f"--group-by)"),
            ("warning", notes.repeated, "count a seed more than once (use --group-by to split them)"),
            ("warning", notes.differing, "pool runs that differ in a setting (use --group-by to split them)")):
        if where:
            lines.append(f"{level}: {len(where)} cell(s) {what}: {', '.join(where)}")
    return lines


def _grid_edge(settings: list[tuple], chosen: tuple) -> str | None:
    """"largest"/"smallest" when a one-key numeric sweep of three or more values chose an end of
    it (with two values every choice is an end, which says nothing)."""
    values = [_number_or_text(s[0]) for s in settings if len(s) == 1]
    if len(values) < 3 or len(values) != len(settings) or not all(isinstance(v, float) for v in values):
        return None
    value = _number_or_text(chosen[0])
    return "largest" if value == max(values) else "smallest" if value == min(values) else None


def _number_or_text(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


# ----------------------------------------------------------------------------- rendering

_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def _md_escape(text: str) -> str:
    return str(text).replace("|", r"\|")


def format_cell(cell: Cell | None, digits: int, fmt: str) -> str:
    if cell is None:
        return _MISSING[fmt]
    pm = r" $\pm$ " if fmt == "latex" else " ± "
    spread = f"{pm}{cell.std:.{digits}f}" if cell.std is not None else ""
    return f"{cell.mean:.{digits}f}{spread} ({cell.n})"


def format_pct(pct: float | None) -> str:
    """The tuned share of parameters in % with three significant digits (`100`, `0.0998`)."""
    if pct is None:
        return ""
    if pct == 0:
        return "0"
    if abs(pct) >= 0.001:
        digits = max(0, 2 - int(math.floor(math.log10(abs(pct)))))
        text = f"{pct:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{pct:.2e}"


def _caption(table: Table) -> str:
    if table.metric in (None, "test", "dev"):
        split = table.metric or "test"
        per_task = ", ".join(f"{t} {table.main_metrics[t].split('/', 1)[-1]}" for t in table.tasks
                             if t in table.main_metrics)
        what = f"{split}, each task's main metric ({per_task})" if per_task else f"{split}, each task's main metric"
    else:
        what = table.metric
    models = ", ".join(table.models) or "none"
    text = f"Metric: {what}, ×100, mean ± std over seeds (n). Model: {models}."
    if table.select_by:
        text += f" Settings of {', '.join(table.sweep_keys)} chosen per cell on mean dev main metric."
    return text


def _header(table: Table, fmt: str) -> list[str]:
    names = ["Model"] if len(table.models) > 1 else []
    names += ["Method", *table.group_by, "Tuned %"]
    names += [TASK_LABELS.get(t, t) for t in table.tasks] + ["Avg"]
    return [latex_escape(n) for n in names] if fmt == "latex" else [_md_escape(n) for n in names]


def _body(table: Table, fmt: str) -> list[list[str]]:
    escape = latex_escape if fmt == "latex" else _md_escape
    bold = (lambda s: f"\\textbf{{{s}}}") if fmt == "latex" else (lambda s: f"**{s}**")
    multi = len(table.models) > 1
    lines = []
    for i, row in enumerate(table.rows):
        out = [escape(row.model)] if multi else []
        out += [escape(METHOD_LABELS.get(row.method, row.method)), *(escape(g) for g in row.group),
                escape(format_pct(row.tuned_pct))]
        for task in table.tasks:
            text = format_cell(row.cells.get(task), table.digits, fmt)
            out.append(bold(text) if (i, task) in table.best else text)
        avg = f"{row.average:.{table.digits}f}" if row.average is not None else _MISSING[fmt]
        out.append(bold(avg) if (i, "avg") in table.best else avg)
        lines.append(out)
    return lines


def render(table: Table, fmt: str = "md") -> str:
    """The table as Markdown (`md`), LaTeX (booktabs `tabular`), tidy CSV or, after a dev selection,
    the Hydra overrides of each cell's chosen setting (`overrides`); ends with a newline."""
    if fmt == "markdown":
        fmt = "md"
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return _render_csv(table)
    if fmt == "overrides":
        return _render_overrides(table)
    header = _header(table, fmt)
    body = _body(table, fmt)
    n_text = len(header) - len(table.tasks) - 1
    if fmt == "md":
        out = [_caption(table), ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] * (n_text - 1) + ["---:"] * (len(header) - n_text + 1)) + "|")
        out += ["| " + " | ".join(cells) + " |" for cells in body]
        if not body:
            out.append("")
            out.append("(no completed runs)")
        if table.notes:
            out.append("")
            out += [f"  - {note.strip()}" if note.startswith("  ") else f"- {note}" for note in table.notes]
        return "\n".join(out) + "\n"
    # LaTeX: the tabular only (paste it into a table environment); caption and notes as comments
    cols = "l" * (n_text - 1) + "r" * (len(header) - n_text + 1)
    out = [f"% {_caption(table)}", f"\\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(header) + r" \\",
           r"\midrule"]
    previous = None
    for row, cells in zip(table.rows, body):
        if previous is not None and row.model != previous:
            out.append(r"\midrule")
        previous = row.model
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    out += [f"% {note}" for note in table.notes]
    return "\n".join(out) + "\n"


def hydra_key(key: str) -> str:
    """The command-line override for a record key: `config.optim.lr` -> `optim.lr`."""
    return key[len("config."):] if key.startswith("config.") else key


def _render_overrides(table: Table) -> str:
    """One line per (model, task, method[, group]) cell: the overrides that run its chosen setting.

    The second stage of a two-stage sweep: every setting on one seed, then more seeds of the
    winners, e.g. `... | while read -r cell; do python run.py -m $cell seed=2,3; done`.
    """
    if not table.select_by:
        raise ValueError("--format overrides lists each cell's setting chosen on dev: add --select-by dev")
    lines = []
    for row in table.rows:
        fixed = [f"model={row.model}", f"method={row.method}",
                 *(f"{hydra_key(k)}={v}" for k, v in zip(table.group_by, row.group))]
        for task in table.tasks:
            cell = row.cells.get(task)
            if cell is None or not cell.selected:
                continue
            unset = [k for k, v in cell.selected.items() if v is None or v == "none"]
            if unset:
                # `lr_index=none` would fail in the next stage: say which cell and why, on stderr
                # (stdout stays one runnable line per cell for `while read`)
                print(f"skipped {row.model}/{task}/{row.method}: its chosen runs do not record "
                      f"{', '.join(unset)}; choose by a key every run records (e.g. --sweep-key config.optim.lr)",
                      file=sys.stderr)
                continue
            chosen = [f"{hydra_key(k)}={v}" for k, v in cell.selected.items()]
            lines.append(" ".join([fixed[0], f"task={task}", *fixed[1:], *chosen]))
    return "".join(f"{line}\n" for line in lines)


def _render_csv(table: Table) -> str:
    """Tidy CSV: one line per (row, task) plus one per row for the average (`task=avg`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    selected_cols = [f"selected:{k}" for k in table.sweep_keys] if table.select_by else []
    writer.writerow(["model", "method", *table.group_by, "task", "metric", "mean", "std", "n", "best", "tuned_pct",
                     *selected_cols])
    for i, row in enumerate(table.rows):
        head = [row.model, row.method, *row.group]
        pct = "" if row.tuned_pct is None else f"{row.tuned_pct:.6g}"
        for task in table.tasks:
            cell = row.cells.get(task)
            if cell is None:
                continue
            sel = [cell.selected.get(k, "") if cell.selected else "" for k in table.sweep_keys] if selected_cols else []
            writer.writerow([*head, task, table.main_metrics.get(task, table.metric or ""), f"{cell.mean:.4f}",
                             "" if cell.std is None else f"{cell.std:.4f}", cell.n, int((i, task) in table.best), pct,
                             *sel])
        if row.average is not None:
            writer.writerow([*head, "avg", table.metric or "main", f"{row.average:.4f}", "", len(table.tasks),
                             int((i, "avg") in table.best), pct, *([""] * len(selected_cols))])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- command line

def _split_keys(values: Sequence[str] | None) -> list[str]:
    return [k.strip() for v in values or [] for k in v.split(",") if k.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gem-tables", description="Build the results table from run records (results.json) and/or wandb runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gem-tables outputs/ multirun/ results/runs\n"
               "  gem-tables results/ --select-by dev --format latex --output table.tex\n"
               "  gem-tables results/ --group-by config.method.density --metric dev/acc\n"
               "  gem-tables multirun/ --select-by dev --sweep-key config.lr_index --format overrides\n"
               "  gem-tables --wandb-project ENTITY/PROJECT --wandb-filter '{\"config.task.name\": \"rte\"}'")
    parser.add_argument("paths", nargs="*", help="folders searched recursively for results.json (or record files)")
    parser.add_argument("--wandb-project", metavar="ENTITY/PROJECT", help="also read the runs of this wandb project")
    parser.add_argument("--wandb-filter", metavar="JSON", help="wandb run filter (MongoDB style), e.g. "
                        "'{\"config.task.name\": \"rte\"}'")
    parser.add_argument("--metric", help="metric key for every column (e.g. dev/acc, test/f1), or `dev`/`test` for "
                        "each task's main metric on that split (default: each task's main test metric)")
    parser.add_argument("--group-by", action="append", metavar="KEY", help="extra row keys, e.g. config.optim.lr "
                        "or config.method.density (repeat or comma-separate)")
    parser.add_argument("--select-by", choices=["dev"], help="per (model, task, method), keep the sweep setting "
                        "with the best mean dev main metric and report its test scores")
    parser.add_argument("--sweep-key", action="append", metavar="KEY",
                        help=f"the key(s) --select-by chooses over (default: {', '.join(DEFAULT_SWEEP_KEYS)})")
    parser.add_argument("--tasks", help="comma-separated tasks, in column order (default: all found)")
    parser.add_argument("--methods", help="comma-separated methods to show (default: all found)")
    parser.add_argument("--models", help="comma-separated models to show (default: all found)")
    parser.add_argument("--digits", type=int, default=1, help="decimals of the ×100 scores (default 1)")
    parser.add_argument("--format", choices=[*FORMATS, "markdown"], default="md")
    parser.add_argument("--output", "-o", metavar="PATH", help="write here instead of stdout")
    return parser


def check_selection(records: Sequence[dict], *, group_by: Sequence[str] = (), sweep_keys: Sequence[str] = (),
                    tasks=None, methods=None, models=None) -> str | None:
    """What a typo in the table's options would silently do, as a message (None when all is well).

    A `--group-by`/`--sweep-key` key that no completed record has would group (or select) by
    "none"; a `--tasks`/`--methods`/`--models` value no completed record has would add a blank
    column or drop a row without a word.
    """
    done = [r for r in records if r.get("status") == "completed"]
    if not done:
        return None  # nothing to check against; the table says "(no completed runs)" and why
    for option, keys in (("--group-by", group_by), ("--sweep-key", sweep_keys)):
        for key in keys:
            full = KEY_ALIASES.get(key, key)
            if all(lookup(r, full) is None for r in done):
                return (f"{option} {key}: no completed record has a value for this key. Keys are dotted paths into "
                        f"results.json, e.g. config.optim.lr, config.lr_index, config.method.density")
    for option, field, wanted in (("--tasks", "task", tasks), ("--methods", "method", methods),
                                  ("--models", "model", models)):
        present = sorted({str(r.get(field)) for r in done})
        unknown = [w for w in wanted or () if w not in present]
        if unknown:
            return f"{option}: no completed run of {', '.join(unknown)}; the records hold {', '.join(present)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb_project:
        parser.error("give record folders and/or --wandb-project")
    try:
        records = load_records(args.paths)
    except FileNotFoundError as error:
        parser.error(str(error))
    if args.wandb_project:
        try:
            filters = json.loads(args.wandb_filter) if args.wandb_filter else None
        except json.JSONDecodeError as error:
            parser.error(f"--wandb-filter is not JSON: {error}")
        try:
            records += load_wandb_records(args.wandb_project, filters)
        except Exception as error:  # wandb raises its own types (auth, network, unknown project)
            parser.error(f"--wandb-project {args.wandb_project}: wandb could not list the runs "
                         f"({type(error).__name__}: {error}). Check `wandb login` (or WANDB_API_KEY), the network, "
                         f"and that the project is ENTITY/PROJECT")
    elif args.wandb_filter:
        parser.error("--wandb-filter needs --wandb-project")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    if not records:
        parser.error(f"no run records (results.json) under {', '.join(map(str, args.paths)) or 'the wandb query'}")
    problem = check_selection(records, group_by=_split_keys(args.group_by), sweep_keys=_split_keys(args.sweep_key),
                              tasks=split(args.tasks), methods=split(args.methods), models=split(args.models))
    if problem:
        parser.error(problem)
    table = build_table(records, metric=args.metric, group_by=_split_keys(args.group_by), select_by=args.select_by,
                        sweep_keys=_split_keys(args.sweep_key) or DEFAULT_SWEEP_KEYS, tasks=split(args.tasks),
                        methods=split(args.methods), models=split(args.models), digits=args.digits)
    if args.format == "overrides" and not args.select_by:
        parser.error("--format overrides lists each cell's setting chosen on dev: add --select-by dev")
    text = render(table, args.format)
    if args.format in ("csv", "overrides") and table.notes:
        print("\n".join(table.notes), file=sys.stderr)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out} ({len(table.rows)} rows, {len(table.tasks)} tasks)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
