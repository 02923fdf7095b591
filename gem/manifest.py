"""A manifest of run records: the exact command behind each run, and the machines that ran them.

    python -m gem.manifest results/runs > results/manifest.md

For every `results.json` below the given folders: its folder, status, task, method, seed,
learning rate, density (sparse methods), main test metric, fit time, and the command that
re-runs it, rebuilt from the record's `overrides` (older records: the run's
`.hydra/overrides.yaml`; the command-line overrides, secrets redacted) with `hydra.run.dir` pointing back at the same folder. A footer
lists the distinct machines (platform, CPU count, GPU) and package versions the records
report, so a table built from these records says where its numbers came from.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import yaml

from .records import redact_override_text
from .tables import _md_escape, load_records, lookup

def run_overrides(run_dir: str | Path) -> list[str] | None:
    """The run's command-line overrides (Hydra's `.hydra/overrides.yaml`), secrets redacted."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.exists():
        return None
    overrides = yaml.safe_load(path.read_text()) or []
    return [redact_override_text(str(item)) for item in overrides]


def run_command(record: dict) -> str:
    """`python run.py ...` that re-runs the record's job into the same folder ('' if unknown)."""
    run_dir = Path(record["_path"]).parent
    overrides = record.get("overrides")  # the record's own copy (older records: Hydra's file)
    overrides = run_overrides(run_dir) if overrides is None else [redact_override_text(str(o)) for o in overrides]
    if overrides is None:
        return ""
    return " ".join(["python run.py", *(shlex.quote(o) for o in overrides), shlex.quote(f"hydra.run.dir={run_dir}")])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return _md_escape(value)


def _main_test_metric(record: dict) -> str:
    name = record.get("main_metric")  # e.g. "test/acc"
    value = (record.get("metrics") or {}).get(name) if name else None
    return f"{name} {value:.4f}" if isinstance(value, (int, float)) else ""


def _short_commit(record: dict) -> str:
    commit = str(record.get("git_commit") or "")
    return commit[:8] + ("+dirty" if commit.endswith("+dirty") else "")


def machine_summary(records: Sequence[dict]) -> list[str]:
    machines: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    for record in records:
        host = record.get("host") or {}
        gpus = host.get("gpus")
        gpu = "GPU not recorded" if gpus is None else (" + ".join(gpus) if gpus else "no GPU")
        machines[f"{host.get('platform', '?')}, {host.get('cpu_count', '?')} CPUs, {gpu}"] += 1
        versions[", ".join(f"{k} {v}" for k, v in sorted((record.get("versions") or {}).items()))] += 1
    lines = ["Machines (runs):"]
    lines += [f"- {m} ({n})" for m, n in sorted(machines.items())]
    lines += ["", "Package versions (runs):"]
    lines += [f"- {v} ({n})" for v, n in sorted(versions.items())]
    return lines


def manifest_markdown(records: Sequence[dict]) -> str:
    lines = [
        "| run | status | task | method | seed | lr | density | test | fit (s) | commit | command |",
        "|---|---|---|---|---:|---:|---:|---|---:|---|---|",
    ]
    for record in records:
        run_dir = Path(record["_path"]).parent
        command = run_command(record)
        lines.append("| " + " | ".join([
            _cell(run_dir),
            _cell(record.get("status")),
            _cell(record.get("task")),
            _cell(record.get("method")),
            _cell(record.get("seed")),
            _cell(lookup(record, "config.optim.lr")),
            _cell(lookup(record, "config.method.density")),
            _main_test_metric(record),
            _cell(lookup(record, "time_s.fit")),
            _short_commit(record),
            f"`{command}`" if command else "(no .hydra/overrides.yaml: see results/README.md)",
        ]) + " |")
    lines += ["", f"{len(records)} records.", "", *machine_summary(records)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="folders holding run records (results.json)")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.paths)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(manifest_markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
