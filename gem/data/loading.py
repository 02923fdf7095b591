"""`load_task`: read a task from local files or the Hub, turn rows into examples, sample the splits.

Data comes from, in this order: the `data_dir` argument, the `GEM_DATA_DIR` environment
variable, the Hugging Face Hub. Local files are read with `datasets.load_dataset("csv" |
"json")`; MultiRC and SQuAD files are nested and are flattened here into the Hub's row shape.

Every example is a dict:

    uid     "<task>/<official split>/<id>"  (the same for local files and the Hub)
    text_a  str               first text (premise, sentence, passage, question, prompt)
    text_b  str | None        second text of a pair
    label   int | float | None  index into label_names; float for regression; None for generation
    choices list[str] | None  multiple choice only (COPA: choice1, choice2)
    target  str | None        generation only: the reference output (GSM8k answer, MBPP code,
                              SQuAD's first gold answer; all gold answers stay in raw)
    raw     dict              the source row, as read (flattened for MultiRC and SQuAD)
    ...                       plus the task's `fields.extra` keys (COPA: question; WiC: word)
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from gem.data.sampling import draw_from, draw_test, draw_train_dev, fallback_split
from gem.data.tasks import DataError, SourceSpec, TaskData, TaskSpec, normalise_label_key, parse_task_config
from gem.hub import OFFLINE_VARIABLES
from gem.hub import hub_offline as _hub_offline

log = logging.getLogger(__name__)

_OFFLINE_VARS = OFFLINE_VARIABLES["datasets"]


def hub_offline() -> bool:
    """Whether the environment forbids the Hub for datasets (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return _hub_offline("datasets")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str | None:
    """The explicit argument, else $GEM_DATA_DIR, else None (= the Hub)."""
    if data_dir is not None and str(data_dir).strip():
        return str(data_dir)
    env = os.environ.get("GEM_DATA_DIR", "").strip()
    return env or None


def load_task(task_cfg: Any, data_dir: str | os.PathLike | None = None, seed: int = 0) -> TaskData:
    """Load one task (a `conf/task/<name>.yaml` config) and sample train/dev/test by the protocol."""
    spec = parse_task_config(task_cfg)
    root = resolve_data_dir(data_dir)
    if root is None and _absolute_files(spec):
        root = "/"  # the task names its files by absolute paths: no data_dir needed
    if root is not None:
        pools, source, fallback = _read_local(spec, root)
    else:
        pools, source, fallback = _read_hub(spec), _hub_label(spec), False
    train, dev, test, notes = _sample(spec, pools, int(seed), fallback)
    for note in notes:  # every protocol deviation is logged once, here
        log.warning(note)
    log.info("task %s from %s: train/dev/test = %d/%d/%d (seed %d, test_seed %d)",
             spec.name, source, len(train), len(dev), len(test), seed, spec.test_seed)
    return TaskData(name=spec.name, kind=spec.kind, label_names=list(spec.label_names),
                    metrics=list(spec.metrics), train=train, dev=dev, test=test, source=source, notes=notes)


# --------------------------------------------------------------------------- sampling


def _sample(spec: TaskSpec, pools: dict[str, list[dict]], seed: int, fallback: bool):
    notes: list[str] = []
    val = pools["test"]
    if fallback:
        test_idx, rest = fallback_split(len(val), spec.num_test, spec.test_seed)
        test, train_pool = [val[i] for i in test_idx], [val[i] for i in rest]
        note = (f"{spec.name}: no official train split ({spec.local.files.get('train')} missing); "
                f"protocol fallback: test = {len(test)} of the {len(val)} '{spec.split_name('test')}' rows "
                f"(fixed test_seed={spec.test_seed}, at most half), train/dev drawn with seed {seed} from the "
                f"other {len(train_pool)} rows of that split; not comparable to runs with the official train split")
        notes.append(note)
    else:
        test = [val[i] for i in draw_test(len(val), spec.num_test, spec.test_seed)]
        train_pool = pools["train"]
    if "dev" in pools:
        dev_pool = pools["dev"]
        train = [train_pool[i] for i in draw_from(len(train_pool), spec.num_train, seed)]
        dev = [dev_pool[i] for i in draw_from(len(dev_pool), spec.num_dev, seed)]
        notes.append(f"{spec.name}: dev drawn from the official '{spec.split_name('dev')}' split "
                     f"({len(dev)} of {len(dev_pool)}), not from train")
        for part, want, got, pool in (("train", spec.num_train, len(train), train_pool),
                                      ("dev", spec.num_dev, len(dev), dev_pool)):
            if want is not None and got < want:
                notes.append(f"{spec.name}: {part} has only {len(pool)} rows (< num_{part} {want}); all used")
    else:
        train_idx, dev_idx, note = draw_train_dev(len(train_pool), spec.num_train, spec.num_dev, seed,
                                                  spec.small_train_dev_fraction)
        train, dev = [train_pool[i] for i in train_idx], [train_pool[i] for i in dev_idx]
        if note:
            notes.append(f"{spec.name}: {note}")
    for part, rows in (("train", train), ("test", test)) + ((("dev", dev),) if spec.num_dev != 0 else ()):
        if not rows:
            raise DataError(f"task {spec.name}: the sampled {part} split is empty "
                            f"(num_train={spec.num_train}, num_dev={spec.num_dev}, num_test={spec.num_test}); "
                            f"set task.num_{part} to at least 1 (or null for every available row)")
    return train, dev, test, notes


# --------------------------------------------------------------------------- local files


def _absolute_files(spec: TaskSpec) -> bool:
    files = spec.local.files
    return bool(files) and all(Path(str(rel)).expanduser().is_absolute() for rel in files.values())


def _layout_text(spec: TaskSpec, root: Path) -> str:
    return "; ".join(f"{role}: {root / rel}" for role, rel in spec.local.files.items())


def _read_local(spec: TaskSpec, root_arg: str) -> tuple[dict[str, list[dict]], str, bool]:
    root = Path(root_arg).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"task {spec.name}: data_dir {root} is not a folder (from data_dir or GEM_DATA_DIR); "
                        f"expected the official GLUE/SuperGLUE layout, e.g. {_layout_text(spec, root)}")
    if not spec.local.files:
        raise DataError(f"task {spec.name}: its config has no local layout (local.files); use the Hub "
                        f"(data_dir=None, GEM_DATA_DIR unset)")
    # relative to data_dir; an absolute (or ~) path is read where it is
    paths = {role: root / Path(str(rel)).expanduser() for role, rel in spec.local.files.items()}
    missing = [role for role, path in paths.items() if not path.is_file()]
    fallback = False
    if "train" in missing and "test" not in missing and spec.missing_train == "split_validation":
        missing.remove("train")
        fallback = True
    if missing:
        raise DataError(f"task {spec.name}: missing file(s) {', '.join(str(paths[r]) for r in missing)}. "
                        f"Expected layout under {root}: {_layout_text(spec, root)}")
    cache: dict[Path, list[dict]] = {}
    pools: dict[str, list[dict]] = {}
    for role, path in paths.items():
        if fallback and role == "train":
            continue
        if path not in cache:
            cache[path] = _read_file(spec, path)
        rows = cache[path]
        if spec.local.id_splits:
            rows = _select_id_split(spec, rows, spec.split_name(role))
        pools[role] = _examples(spec, spec.local, rows, role, str(path))
    folder = os.path.commonpath([str(paths[role].parent) for role in pools])
    return pools, f"local:{folder}", fallback


def _read_advice(spec: TaskSpec, path: Path) -> str:
    """What to do about a file that does not read: for one of the shipped tasks, restore the
    official file; for one's own data, the format and reader settings to check."""
    from gem.data.tasks import CONF_TASK_DIR

    hint = _format_hint(spec, path)
    if (CONF_TASK_DIR / f"{spec.name}.yaml").is_file() and spec.hub.path:
        return (f"{hint}This is one of the shipped tasks: restore the file from the dataset's official release "
                f"(or drop data_dir to read {spec.hub.path} from the Hub)")
    return (f"{hint}Check local.format (tsv, csv, jsonl or json) and the reader options local.read "
            f"(delimiter, quoting, header, column_names; README, \"Your own task\")")


def _format_hint(spec: TaskSpec, path: Path) -> str:
    """A likely format mix-up, from the file's first line."""
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
    except OSError:
        return ""
    fmt = spec.local.format
    if fmt == "tsv" and "\t" not in first and "," in first:
        return "The first line has commas and no tab: a comma-separated file is local.format: csv. "
    if fmt == "csv" and "\t" in first and "," not in first:
        return "The first line has tabs and no comma: a tab-separated file is local.format: tsv. "
    if fmt in ("tsv", "csv") and first.lstrip().startswith(("{", "[")):
        return "The file looks like JSON: local.format: jsonl (one object per line) or json. "
    return ""


def _first_problem(path: Path, fmt: str) -> str | None:
    """What is wrong with a file `datasets` could not read, in words and with its line number:
    empty, a byte that is not UTF-8, a JSON line that does not parse, a TSV line with more or
    fewer fields than the header; None when nothing simple is found."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    if not data.strip():
        return "the file is empty"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        return (f"line {line} holds a byte that is not UTF-8 (0x{data[error.start]:02x} at byte {error.start}); "
                f"the file must be UTF-8: re-encode it (e.g. iconv -f latin1 -t utf-8)")
    lines = text.splitlines()
    if fmt == "jsonl":
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as error:
                    return f"line {number} is not valid JSON ({error}); truncated or corrupt?"
    if fmt == "tsv" and lines:
        width = lines[0].count("\t") + 1
        for number, line in enumerate(lines[1:], 2):
            fields = line.count("\t") + 1
            if line.strip() and fields != width:
                more = "an extra column" if fields > width else "a missing column"
                return (f"line {number} has {fields} tab-separated fields but the header has {width} ({more}; "
                        f"a tab inside a text?)")
    return None


def _root_cause(error: BaseException) -> str:
    """`datasets` wraps the parser's error ("An error occurred while generating the dataset"):
    the innermost cause names what was wrong."""
    seen = error
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    return f"{type(seen).__name__}: {seen}"


# Reader options by local.format; `local.read` adds to or replaces them (README, "Your own task").
# tsv: the GLUE files (tab-separated, quote characters are text: quoting=3, csv.QUOTE_NONE);
# csv: ordinary comma-separated files (a field with a comma or a line break is quoted: "a, b").
# Empty fields stay "" (not NaN) in both.
_CSV_DEFAULTS = {
    "tsv": {"delimiter": "\t", "quoting": 3, "keep_default_na": False, "na_filter": False},
    "csv": {"delimiter": ",", "quoting": 0, "keep_default_na": False, "na_filter": False},
}
LOCAL_FORMATS = ("tsv", "csv", "jsonl", "json")


def _read_file(spec: TaskSpec, path: Path) -> list[dict]:
    import datasets

    src = spec.local
    read = dict(src.read)
    quiet = datasets.is_progress_bar_enabled()
    if quiet:  # no progress bars for small local files; restored below
        datasets.disable_progress_bars()
    try:
        if src.format in _CSV_DEFAULTS:
            options = {**_CSV_DEFAULTS[src.format], **read}
            ds = datasets.load_dataset("csv", data_files={"data": str(path)}, split="data", **options)
        elif src.format in ("jsonl", "json"):
            ds = datasets.load_dataset("json", data_files={"data": str(path)}, split="data", **read)
        else:
            raise DataError(f"task {spec.name}: local.format must be one of {', '.join(LOCAL_FORMATS)}, "
                            f"got {src.format!r}")
    except DataError:
        raise
    except Exception as error:  # a malformed file: say which one, and where if we can
        raise DataError(f"task {spec.name}: could not read {path} as {src.format}"
                        f"{f' (local.read: {read})' if read else ''}: "
                        f"{_first_problem(path, src.format) or _root_cause(error)}. "
                        f"{_read_advice(spec, path)}") from error
    finally:
        if quiet:
            datasets.enable_progress_bars()
    rows = ds.to_list()
    if src.layout == "multirc":
        rows = flatten_multirc(rows)
    elif src.layout == "squad":
        rows = flatten_squad(rows)
    elif src.layout != "rows":
        raise DataError(f"task {spec.name}: local.layout must be rows, multirc or squad, got {src.layout!r}")
    return rows


def _select_id_split(spec: TaskSpec, rows: list[dict], split: str) -> list[dict]:
    """Rows of one official split of a file that holds several, by id ranges (MBPP)."""
    conf = spec.local.id_splits
    if split not in conf["ranges"]:
        raise DataError(f"task {spec.name}: local.id_splits.ranges has no split {split!r} "
                        f"(has {sorted(conf['ranges'])})")
    lo, hi = conf["ranges"][split]
    return [row for row in rows if lo <= int(row[conf["field"]]) <= hi]


def flatten_multirc(rows: list[dict]) -> list[dict]:
    """SuperGLUE MultiRC paragraphs -> one row per (paragraph, question, answer), as on the Hub."""
    out = []
    for par in rows:
        text = par["passage"]["text"]
        for q in par["passage"]["questions"]:
            for a in q["answers"]:
                out.append({"paragraph": text, "question": q["question"], "answer": a["text"],
                            "idx": {"paragraph": par["idx"], "question": q["idx"], "answer": a["idx"]},
                            "label": a.get("label")})
    return out


def flatten_squad(rows: list[dict]) -> list[dict]:
    """SQuAD v1.1 articles (the file's "data" list) -> one row per question, as on the Hub."""
    out = []
    for article in rows:
        for par in article["paragraphs"]:
            for qa in par["qas"]:
                answers = qa.get("answers") or []
                out.append({"id": qa["id"], "title": article.get("title", ""), "context": par["context"],
                            "question": qa["question"],
                            "answers": {"text": [a["text"] for a in answers],
                                        "answer_start": [int(a["answer_start"]) for a in answers]}})
    return out


# --------------------------------------------------------------------------- the Hub


def _hub_label(spec: TaskSpec) -> str:
    return "hub:" + "/".join(x for x in (spec.hub.path, spec.hub.name) if x)


def _hub_hint(spec: TaskSpec) -> str:
    dataset = spec.hub.path + (f" ({spec.hub.name})" if spec.hub.name else "")
    return (f"task {spec.name} needs data: pass data_dir=PATH (a folder in the official GLUE/SuperGLUE "
            f"layout, e.g. ../shared/data) or set GEM_DATA_DIR, or go online so the Hub dataset "
            f"{dataset} can be downloaded")


def _read_hub(spec: TaskSpec) -> dict[str, list[dict]]:
    if not spec.hub.path or not spec.hub.splits:
        raise DataError(f"task {spec.name}: no data_dir and no Hub dataset in its config; pass data_dir=PATH "
                        f"or set GEM_DATA_DIR")
    if hub_offline():
        raise DataError(_hub_hint(spec) + f" ({' / '.join(_OFFLINE_VARS)} is set, so the Hub is not tried)")
    import datasets

    pools = {}
    for role, split in spec.hub.splits.items():
        try:
            ds = datasets.load_dataset(spec.hub.path, spec.hub.name, split=split)
        except Exception as error:
            raise DataError(_hub_hint(spec) + f" (loading split {split!r} failed: {type(error).__name__}: "
                                              f"{error})") from error
        pools[role] = _examples(spec, spec.hub, ds.to_list(), role, f"{_hub_label(spec)}[{split}]")
    if "test" not in pools:
        raise DataError(f"task {spec.name}: hub.splits names no 'test' split")
    return pools


# --------------------------------------------------------------------------- rows -> examples


def get_path(row: Any, path: str) -> Any:
    """`row["a"]["b"][0]` for the path "a.b.0"; a KeyError/IndexError when it does not exist."""
    if isinstance(row, dict) and path in row:
        return row[path]
    value = row
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, (list, tuple)) else value[part]
    return value


def _examples(spec: TaskSpec, src: SourceSpec, rows: list[dict], role: str, where: str) -> list[dict]:
    if not rows:
        raise DataError(f"task {spec.name}: the {role} split ({where}) has no rows")
    split = spec.split_name(role)
    if src.label_map:
        bad = sorted(set(src.label_map.values()) - set(spec.label_names))
        if bad:
            raise DataError(f"task {spec.name}: label_map values {bad} are not in label_names {spec.label_names}")
    out, seen = [], set()
    for i, row in enumerate(rows):
        try:
            ex = _example(spec, src, row, i, split)
        except (KeyError, IndexError, TypeError) as error:
            hint = ""
            if src is spec.local and len(row) == 1 and any(sep in str(next(iter(row))) for sep in (",", "\t", ";")):
                hint = (f" (the whole line was read as one column {next(iter(row))!r}: local.format "
                        f"{src.format!r} splits at the wrong delimiter; a comma-separated file is local.format: csv, "
                        f"or set local.read.delimiter)")
            raise DataError(f"task {spec.name}: row {i} of {where} lacks a configured field ({error!r}); "
                            f"its columns: {sorted(row)}; configured fields: {src.fields}{hint}") from error
        if ex["uid"] in seen:
            raise DataError(f"task {spec.name}: duplicate uid {ex['uid']} in {where}; fix fields.uid")
        seen.add(ex["uid"])
        out.append(ex)
    return out


def _text(row: dict, spec_field: Any) -> str | None:
    if spec_field is None:
        return None
    if isinstance(spec_field, (list, tuple)):
        return " ".join(str(get_path(row, c)).strip() for c in spec_field).strip()
    value = get_path(row, spec_field)
    return "" if value is None else str(value).strip()


def _example(spec: TaskSpec, src: SourceSpec, row: dict, index: int, split: str) -> dict:
    f = src.fields
    uid_field = f.get("uid")
    if uid_field is None:
        uid = str(index)
    elif isinstance(uid_field, (list, tuple)):
        uid = "-".join(str(get_path(row, c)) for c in uid_field)
    else:
        uid = str(get_path(row, uid_field))
    uid = f"{spec.name}/{split}/{uid}"
    ex: dict[str, Any] = {"uid": uid, "text_a": _text(row, f["text_a"]), "text_b": _text(row, f.get("text_b")),
                          "label": None, "choices": None, "target": None}
    if spec.kind == "multiple_choice":
        ex["choices"] = [str(get_path(row, c)) for c in f["choices"]]
    if spec.kind == "generation":
        if f.get("target") is not None:
            target = get_path(row, f["target"])
            ex["target"] = None if target is None else str(target)
    else:
        ex["label"] = _label(spec, src, get_path(row, f["label"]), uid)
    for key, column in (f.get("extra") or {}).items():
        ex[key] = get_path(row, column)
    ex["raw"] = row
    return ex


def _label(spec: TaskSpec, src: SourceSpec, value: Any, uid: str) -> int | float:
    if spec.kind == "regression":
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise DataError(f"task {spec.name}: example {uid} has a non-numeric score {value!r}")
        return number
    key = normalise_label_key(value)
    names = spec.label_names
    if src.label_map and key in src.label_map:
        return names.index(src.label_map[key])
    lowered = [n.lower() for n in names]
    if key in lowered:
        return lowered.index(key)
    if not src.label_map and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value  # Hub ClassLabel ints, in label_names order
    raise DataError(f"task {spec.name}: example {uid} has label {value!r}, outside the label set {names}"
                    + (f" (label_map {src.label_map})" if src.label_map else ""))
