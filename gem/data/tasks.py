"""What a task is: its config (one `conf/task/<name>.yaml`), the loaded `TaskData`, and `DataError`.

A task config has these keys (defaults in `TaskSpec`):

    name, kind, metrics, label_names        what the task is
    num_train, num_dev, num_test, test_seed  the sampling protocol (see `gem.data.sampling`)
    small_train_dev_fraction                 dev share when the train split is too small
    missing_train                            "error" | "split_validation" (offline fallback)
    max_length                               for the collators
    fields                                   canonical field -> column of a (flattened) row
    local: {format, layout, files, read, fields, label_map, id_splits}
    hub:   {path, name, splits, fields, label_map}

`fields` maps the canonical example keys to columns: `text_a`, `text_b` (a column, a list
of columns joined by a space, or null), `label`, `uid` (column or list of columns; null =
row number), `choices` (list of columns, multiple choice), `target` (generation reference)
and `extra` (more keys copied into each example, e.g. COPA's `question`). A column may be
a dotted path into nested rows (`answers.text.0`). `local.fields` / `hub.fields` override
single entries for one source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

KINDS = ("classification", "regression", "multiple_choice", "generation")
METRICS = ("acc", "mcc", "f1", "pearson", "spearman", "em", "pass@1")
ROLES = ("train", "test", "dev")  # official split used as: train pool, test pool, (optional) dev pool
CONF_TASK_DIR = Path(__file__).resolve().parents[2] / "conf" / "task"


class DataError(ValueError):
    """A task's data cannot be loaded as configured; the message says what to do."""


@dataclass
class TaskData:
    """One task after loading and sampling. Examples are plain dicts (see `gem.data.loading`)."""

    name: str
    kind: str
    label_names: list[str]
    metrics: list[str]
    train: list[dict]
    dev: list[dict]
    test: list[dict]
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def split_sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def num_labels(self) -> int:
        if self.kind == "regression":
            return 1
        return len(self.label_names)


@dataclass
class SourceSpec:
    """Where one source (local files or the Hub) keeps the task, and how its rows read."""

    fields: dict[str, Any]
    label_map: dict[str, str] | None = None
    # local
    format: str | None = None  # tsv | csv | jsonl | json
    layout: str = "rows"  # rows | multirc | squad
    files: dict[str, str] = field(default_factory=dict)  # role -> path relative to data_dir (or absolute)
    # reader options for datasets' csv builder (tsv, csv: delimiter, quoting, header, column_names,
    # quotechar, escapechar, skiprows, ...) or json builder (jsonl, json: field)
    read: dict[str, Any] = field(default_factory=dict)
    id_splits: dict[str, Any] | None = None  # {field, ranges: {split: [lo, hi]}, use: {role: split}}
    # hub
    path: str | None = None
    name: str | None = None
    splits: dict[str, str] = field(default_factory=dict)  # role -> official split name


@dataclass
class TaskSpec:
    name: str
    kind: str
    metrics: list[str]
    label_names: list[str]
    local: SourceSpec
    hub: SourceSpec
    num_train: int | None = 1000
    num_dev: int | None = 500
    num_test: int | None = 1000
    test_seed: int = 0
    small_train_dev_fraction: float | None = None
    missing_train: str = "error"
    max_length: int = 256

    def split_name(self, role: str) -> str:
        """The official split a role reads (used in uids, so local and Hub uids agree)."""
        return self.hub.splits.get(role) or {"train": "train", "test": "validation", "dev": "dev"}[role]

    @property
    def roles(self) -> list[str]:
        return [r for r in ROLES if r in self.local.files or r in self.hub.splits]


def _plain(cfg: Any) -> Any:
    """DictConfig/ListConfig -> plain containers; plain values pass through."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return cfg


def _opt_int(value: Any, key: str, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or int(value) < 0:
        raise DataError(f"task {name}: {key} must be a non-negative integer or null, got {value!r}")
    return int(value)


def _norm_map(mapping: Mapping | None) -> dict[str, str] | None:
    if mapping is None:
        return None
    return {normalise_label_key(k): str(v) for k, v in mapping.items()}


def normalise_label_key(value: Any) -> str:
    """One spelling for raw label values: True -> "true", 1.0 -> "1", " Yes " -> "yes"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip().lower()


def _source(raw: Mapping | None, base_fields: dict, kind: str) -> SourceSpec:
    raw = dict(raw or {})
    fields = {**base_fields, **(raw.pop("fields", None) or {})}
    known = set(SourceSpec.__dataclass_fields__) - {"fields"}
    unknown = set(raw) - known
    if unknown:
        raise DataError(f"unknown source keys {sorted(unknown)} (known: {sorted(known)})")
    spec = SourceSpec(fields=fields, **{k: v for k, v in raw.items() if v is not None})
    spec.label_map = _norm_map(raw.get("label_map"))
    spec.files = dict(spec.files or {})
    spec.splits = dict(spec.splits or {})
    spec.read = dict(spec.read or {})
    return spec


def parse_task_config(cfg: Any) -> TaskSpec:
    """Validate one task config (DictConfig or dict) and fill in the defaults."""
    raw = dict(_plain(cfg) or {})
    name = raw.get("name")
    if not name:
        raise DataError(f"task config has no name: {raw!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise DataError(f"task {name}: kind must be one of {KINDS}, got {kind!r}")
    metrics = list(raw.get("metrics") or [])
    bad = [m for m in metrics if m not in METRICS]
    if not metrics or bad:
        raise DataError(f"task {name}: metrics must be a non-empty list from {METRICS}, got {metrics!r}")
    label_names = [str(x) for x in (raw.get("label_names") or [])]
    if kind in ("classification", "multiple_choice") and len(label_names) < 2:
        raise DataError(f"task {name}: a {kind} task needs label_names (at least two)")
    base_fields = dict(raw.get("fields") or {})
    missing_train = raw.get("missing_train", "error")
    if missing_train not in ("error", "split_validation"):
        raise DataError(f"task {name}: missing_train must be 'error' or 'split_validation'")
    frac = raw.get("small_train_dev_fraction")
    if frac is not None and not 0 < float(frac) < 1:
        raise DataError(f"task {name}: small_train_dev_fraction must lie in (0, 1), got {frac!r}")
    spec = TaskSpec(
        name=str(name), kind=kind, metrics=metrics, label_names=label_names,
        local=_source(raw.get("local"), base_fields, kind),
        hub=_source(raw.get("hub"), base_fields, kind),
        num_train=_opt_int(raw.get("num_train", 1000), "num_train", name),
        num_dev=_opt_int(raw.get("num_dev", 500), "num_dev", name),
        num_test=_opt_int(raw.get("num_test", 1000), "num_test", name),
        test_seed=int(raw.get("test_seed", 0) or 0),
        small_train_dev_fraction=None if frac is None else float(frac),
        missing_train=missing_train,
        max_length=int(raw.get("max_length", 256)),
    )
    if "test" not in spec.local.files and "test" not in spec.hub.splits:
        raise DataError(f"task {name}: neither local.files nor hub.splits names a 'test' split")
    return spec


def available_tasks() -> list[str]:
    """Names of the task configs shipped in conf/task/."""
    return sorted(p.stem for p in CONF_TASK_DIR.glob("*.yaml"))


def load_task_config(name: str, **overrides: Any):
    """Read conf/task/<name>.yaml as a DictConfig (for tests, notebooks and scripts)."""
    from omegaconf import OmegaConf

    path = CONF_TASK_DIR / f"{name}.yaml"
    if not path.is_file():
        raise DataError(f"no task config {path} (available: {', '.join(available_tasks())})")
    cfg = OmegaConf.load(path)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg
