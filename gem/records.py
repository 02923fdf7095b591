"""The run record: one `results.json` per run, written atomically.

Tables are rebuilt from these records, so a record is flat enough for pandas and
complete enough to regroup runs without rerunning anything. `status` is `completed`
only when the run finished; a crashed run leaves `running` or `failed` behind.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_NAME = "results.json"
RECORD_VERSION = 1
_PACKAGES = ("torch", "lightning", "transformers", "datasets", "peft", "hydra-core", "wandb", "torchmetrics", "safetensors")
# Keys that may hold secrets; they never reach a record. A key is secret when its name
# contains one of _SECRET_PARTS or ends in "token" (hub_token, auth_token), except the
# tokenizer's special tokens; `max_new_tokens` or `pad_token_id` are settings, not secrets.
_SECRET_PARTS = ("api_key", "apikey", "password", "secret")
_SPECIAL_TOKENS = {"bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"}


_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e-?\d+)?)")


def path_sort_key(path: str) -> list:
    """Run folders in numeric order: multirun job `10` after `2`, `s10` after `s2`, `d0.01` after
    `d0.005`, `lr1e-4` after `lr5e-5`: numbers (decimals and exponents included) compare as numbers."""
    return [float(part) if i % 2 else part for i, part in enumerate(_NUMBER.split(path))]


def is_secret_key(key: Any) -> bool:
    """Whether a config key (its last dotted part) names a credential."""
    name = str(key).lower().lstrip("+~").rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    if any(part in name for part in _SECRET_PARTS):
        return True
    return name.endswith("token") and name not in _SPECIAL_TOKENS


class RecordError(OSError):
    """The record could not be written; nothing was left half-written."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The project's commit, with `+dirty` when the tree has uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def host_info() -> dict[str, Any]:
    """Platform, CPU count and the visible GPUs (names; empty list on a CPU-only machine)."""
    gpus: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA setup must not stop the record
        gpus = ["unknown (CUDA query failed)"]
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "gpus": gpus}


def redact_secrets(value: Any) -> Any:
    """Drop values under keys that look like credentials, and `key=value` overrides of such
    keys inside strings, at any depth."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if is_secret_key(k) else redact_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    if isinstance(value, str):
        return redact_override_text(value)
    return value


_OVERRIDE = re.compile(r"((?:^|(?<=[,\s]))([+~]*[\w.\-/]+)=)([^,\s]*)")


def redact_override_text(text: str) -> str:
    """`logger.api_key=abc` -> `logger.api_key=<redacted>` wherever it appears in `text`
    (a single override, or Hydra's comma-joined `override_dirname`)."""
    return _OVERRIDE.sub(lambda m: m.group(1) + "<redacted>" if is_secret_key(m.group(2)) else m.group(0), text)


def redact_hydra_files(*folders: str | Path) -> list[Path]:
    """Rewrite the YAML files Hydra saved (`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`,
    a sweep's `multirun.yaml`) with secret-looking keys and overrides redacted.

    Hydra writes them before the job starts, command-line overrides included, so a key passed
    as `logger.api_key=...` would otherwise sit in the run folder in plain text. Files without
    secrets are left untouched. Returns the files rewritten.
    """
    import yaml

    rewritten: list[Path] = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.yaml")):
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            clean = redact_secrets(data)
            if clean != data:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(yaml.safe_dump(clean, sort_keys=False))
                os.replace(tmp, path)
                rewritten.append(path)
    return rewritten


def process_rank() -> int:
    """This process's global rank under DDP/torchrun/SLURM launches (0 when not distributed)."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 0


def write_json_atomically(path: str | Path, data: dict) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    A reader (the table command, a concurrent sweep) sees either the old record or
    the new one, never a truncated file; a full disk raises `RecordError` and leaves
    the previous record in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; a record is an ordinary file
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise RecordError(f"could not write the run record {path}: {error}. Free disk space or "
                          f"point hydra.run.dir at a writable folder.") from error
    return path


def current_umask() -> int:
    """The process's umask (read without changing it where /proc says it; else set and put back)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give the files under `path` (or the file itself) the mode an ordinary `open` would give them
    under the umask (0644 under 0022). Libraries that write through temporary files (safetensors)
    leave 0600 files, which other users of a shared results folder cannot read."""
    path = Path(path)
    mask = current_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        if item.is_file():
            os.chmod(item, 0o666 & ~mask)
        elif item.is_dir():
            os.chmod(item, 0o777 & ~mask)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


class RunRecord:
    """Accumulates a run's facts and rewrites `results.json` whenever they change."""

    def __init__(self, run_dir: str | Path, *, method: str, task: str, model: str, seed: int, config: dict):
        self.path = Path(run_dir) / RECORD_NAME
        self.data: dict[str, Any] = {
            "record_version": RECORD_VERSION,
            "status": "running",
            "method": method,
            "task": task,
            "model": model,
            "seed": seed,
            "metrics": {},
            "params": {},
            "time_s": {},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git_commit(),
            "versions": package_versions(),
            "host": host_info(),
            "config": redact_secrets(config),
        }

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> Path:
        # Under DDP every rank runs the same code; only rank 0 writes, so the record exists once.
        if process_rank() != 0:
            return self.path
        return write_json_atomically(self.path, self.data)

    @contextmanager
    def phase(self, name: str):
        """Time a phase (`load`, `selection`, `train`, `test`, ...) into `time_s`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data["time_s"][name] = round(time.perf_counter() - start, 3)

    def finish(self, status: str = "completed", error: str | None = None) -> Path:
        self.data["status"] = status
        self.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if error:
            self.data["error"] = error
        return self.write()


def read_record(path: str | Path) -> dict:
    with open(path) as handle:
        return json.load(handle)


def find_records(*roots: str | Path) -> list[Path]:
    """Every results.json under the given folders (a record path itself is accepted)."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_file() and root.name == RECORD_NAME:
            found.append(root)
        elif root.is_dir():
            found.extend(sorted(root.rglob(RECORD_NAME)))
    return found
