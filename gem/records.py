"""The run record: one `results.json` per run, written atomically.

Tables are rebuilt from these records, so a record is flat enough for pandas and
complete enough to regroup runs without rerunning anything. `status` is `completed`
only when the run finished; a crashed run leaves `failed`, a run stopped by SIGTERM/SIGINT
`terminated`, a killed one `running` behind.

Secrets never reach a record: `redact_secrets` removes values under credential-like keys and
values shaped like credentials (service tokens, generated-looking strings; `looks_random`),
wherever the user supplied them.
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
# contains one of _SECRET_PARTS or ends in "token" or "key" (hub_token, wandb_key), except the
# tokenizer's special tokens; `max_new_tokens` or `pad_token_id` are settings, not secrets.
_SECRET_PARTS = ("api_key", "apikey", "password", "passwd", "passphrase", "secret", "credential", "private_key",
                 "access_key", "auth")
_SPECIAL_TOKENS = {"bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"}
# Keys whose values are hashes by design (a model revision, a commit, a checksum): a long hex or
# random-looking value under them is an identifier, not a credential. Service tokens (hf_..., below)
# are redacted under any key.
_HASH_KEYS = ("revision", "commit", "sha", "hash", "checksum", "digest", "fingerprint")
# Tokens of the common services, recognised by their shape wherever they appear in a string.
_SERVICE_TOKEN = re.compile(
    r"hf_[A-Za-z0-9]{20,}"                      # Hugging Face
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"    # OpenAI, Anthropic
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|glpat-[A-Za-z0-9_\-]{20,}"                # GitLab
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"                 # AWS access key id
    r"|xox[abeoprs]-[A-Za-z0-9\-]{10,}"          # Slack
    r"|wandb_v1_[A-Za-z0-9_]{20,}"                # wandb (new-style keys)
)
REDACTED = "<redacted>"


_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e-?\d+)?)")


def path_sort_key(path: str) -> list:
    """Run folders in numeric order: multirun job `10` after `2`, `s10` after `s2`, `d0.01` after
    `d0.005`, `lr1e-4` after `lr5e-5`: numbers (decimals and exponents included) compare as numbers."""
    return [float(part) if i % 2 else part for i, part in enumerate(_NUMBER.split(path))]


def _key_name(key: Any) -> str:
    return str(key).lower().lstrip("+~").rsplit(".", 1)[-1].rsplit("/", 1)[-1]


def is_secret_key(key: Any) -> bool:
    """Whether a config key (its last dotted part) names a credential."""
    name = _key_name(key)
    if any(part in name for part in _SECRET_PARTS):
        return True
    return (name.endswith("token") and name not in _SPECIAL_TOKENS) or name.endswith("key") or name == "pat"


def _is_hash_key(key: Any) -> bool:
    name = _key_name(key)
    return any(part in name for part in _HASH_KEYS)


_PATH_LIKE = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")  # org/name (a Hub id), a relative path of two parts
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-+/=.]+")


def looks_random(text: str) -> bool:
    """A long string with the letter-and-digit mix of a generated key (a password or token given
    under an innocent name): at least 20 letters and digits, high entropy, frequent switches
    between lower case, upper case and digits; or 32+ hex digits (a wandb key is 40). Paths,
    Hub ids (`org/name`) and words joined by `_`/`-` switch too rarely to qualify."""
    import math
    from collections import Counter

    if (len(text) < 20 or text.startswith(("/", ".", "~")) or "://" in text or not _TOKEN_CHARS.fullmatch(text)
            or _PATH_LIKE.fullmatch(text)):
        return False
    if re.fullmatch(r"[0-9a-fA-F]{32,}", text):
        return True
    core = re.sub(r"[^A-Za-z0-9]", "", text)
    if len(core) < 20:
        return False
    kind = [c.isdigit() and "d" or c.isupper() and "u" or "l" for c in core]
    switches = sum(a != b for a, b in zip(kind, kind[1:])) / (len(core) - 1)
    counts = Counter(core)
    entropy = -sum(n / len(core) * math.log2(n / len(core)) for n in counts.values())
    return switches >= 0.3 and entropy >= 3.4 and len(set(kind)) >= 2


def redact_value(text: str, key: Any = None) -> str:
    """A user-given string with secrets taken out: service tokens anywhere in it; the whole value
    when it looks generated (`looks_random`) and its key is not a hash's (`model.revision`)."""
    if key is not None and is_secret_key(key):
        return REDACTED
    text = _SERVICE_TOKEN.sub(REDACTED, text)
    if not (key is not None and _is_hash_key(key)) and looks_random(text):
        return REDACTED
    return text


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


def redact_secrets(value: Any, key: Any = None) -> Any:
    """Drop values under keys that look like credentials, values that look like tokens or
    generated keys, and such `key=value` overrides inside strings, at any depth."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) else redact_secrets(v, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v, key) for v in value]
    if isinstance(value, str):
        return redact_value(redact_override_text(value), key)
    return value


_OVERRIDE = re.compile(r"((?:^|(?<=[,\s]))([+~]*[\w.\-/]+)=)([^,\s]*)")


def _redact_override(match: re.Match) -> str:
    key, value = match.group(2), match.group(3)
    clean = redact_value(value, key)
    return match.group(0) if clean == value else match.group(1) + clean


def redact_override_text(text: str) -> str:
    """`logger.api_key=abc` -> `logger.api_key=<redacted>` wherever it appears in `text` (a single
    override, Hydra's comma-joined `override_dirname`, a command-line argument), and so does a
    token-like value under any key (`+note=hf_...`); service tokens are removed anywhere."""
    return _SERVICE_TOKEN.sub(REDACTED, _OVERRIDE.sub(_redact_override, text))


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with every argument redacted: what wandb stores as the run's `args`."""
    return [argv[0], *(redact_override_text(a) for a in argv[1:])] if argv else []


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
