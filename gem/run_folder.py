"""The run folder's life cycle: one run, one folder, one writer, one honest record.

    lock -> Hydra's files redacted -> folder checks (completed run, overwrite, resume and its
    checkpoint) -> the run's own checks -> record `running` -> ... -> record `completed`,
    `failed` or `terminated` -> lock released

`open_run` is that sequence; `gem.train.run` trains inside it. The pieces:

* **lock**: `<run dir>/.lock` (host, pid, start time), held with `flock` for the process's life
  and released on any exit. Two runs pointed at one folder (the same `hydra.run.dir`, two array
  jobs, two sweeps started in the same second) cannot both write there: the second is refused
  before it writes anything. For single runs `gem.hydra_callbacks` takes the lock before Hydra
  writes `.hydra/` and `run.log`; a sweep's folder is locked before `multirun.yaml` is written.
  A lock left by a killed run is taken over only when its holder is provably gone (same host,
  process not running); a lock from another host is refused, naming the host.
* **folder checks**: a completed run is never replaced by mistake (`overwrite=true` replaces it,
  but only once the new run's settings passed every check); a resume must repeat the killed
  run's settings, and its checkpoint must prove what it is (`gem.lit.resume.verify_checkpoint`).
* **secrets**: Hydra's saved config and command line, the record, and the command line wandb
  stores are redacted (`gem.records.redact_secrets`).
* **signals**: SIGTERM (what schedulers send before a kill) and SIGINT end the run with a
  `terminated` record naming the signal and exit code 128 + signal; `ckpt_path=last` resumes it.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from gem.records import RunRecord, process_rank, redact_argv, redact_hydra_files, redact_override_text, redact_secrets
from gem.run_checks import RunSetupError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# Settings a resumed run may change: where things are read from and written to, not what trains
# (the LR in effect is `optim.lr`; `lr_grids` also lists the other methods' grids).
_RESUME_MAY_CHANGE = ("ckpt_path", "overwrite", "resume_unverified", "data_dir", "num_workers", "logger",
                      "resume_checkpoints", "paths", "trainer.default_root_dir", "lr_grids", "tags")
# What a run writes into its folder; `overwrite=true` removes the previous run's before starting.
_RUN_OUTPUTS = ("results.json", "checkpoint", "lightning", "allocation.csv", "allocation.png",
                "generations_dev.jsonl", "generations_test.jsonl", "evaluations")
_IDENTITY_KEYS = ("method.name", "task.name", "model.name", "seed")
# Where the Hydra callback keeps a completed run's `.hydra/` while `overwrite=true` is checked.
HYDRA_BACKUP = ".hydra.before_overwrite"


# --------------------------------------------------------------------------- the lock
class RunFolderLocked(RunSetupError):
    """Another run holds the folder: nothing was written there."""


_held: dict[str, tuple[int, Path]] = {}  # folder -> (open lock fd, lock path), for this process's locks


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken
    for the lock's holder; None where /proc is not there."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(redact_argv(sys.argv))[:500]}


def _running(pid: int, process_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    now = _process_start(pid)
    return not (process_start and now and now != process_start)  # same pid, another process: the holder is gone


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode())
    except (OSError, ValueError):
        return {}


def _held_message(path: Path, holder: dict, why: str) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('started_at', '?')})"
    return (f"{path.parent} is in use by another run: {who} holds {path} ({why}). Two runs must not share a run "
            f"folder (their records and checkpoints would mix); choose another hydra.run.dir, or wait for that "
            f"run to end. If that run is gone for good, delete {path} and rerun")


def _create(path: Path, me: dict) -> int | None:
    """Create the lock file whole and already flock-ed: written under a private name, then hard-linked
    into place (atomic, fails when the name exists, NFS-safe). Returns the held fd, or None."""
    tmp = path.with_name(f"{LOCK_NAME}.{me['host']}.{me['pid']}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        _flock(fd)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        os.link(tmp, path)
    except FileExistsError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return fd


def _flock(fd: int) -> bool:
    """Exclusive, non-blocking; False when another process holds it. A filesystem without locks
    (ENOLCK) counts as taken-by-us: the holder's pid and host still decide."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def acquire_lock(folder: str | os.PathLike) -> bool:
    """Hold `<folder>/.lock` for this process; True when newly taken, False when this process
    already holds it. Raises `RunFolderLocked` (writing nothing) when another run holds it."""
    folder = Path(os.path.realpath(folder))  # one key for `outputs/x`, `/abs/outputs/x`, `a/../outputs/x`
    if str(folder) in _held:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / LOCK_NAME, _me()
    for _ in range(20):
        fd = _create(path, me)
        if fd is not None:
            _held[str(folder)] = (fd, path)
            return True
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # released in between: try to create it again
        try:
            holder = _read_holder(fd)
            if all(holder.get(k) == me[k] for k in ("host", "pid", "process_start")):
                os.close(fd)  # this very process holds it, reached by another path (a hard link, a bind mount)
                return False
            if not _flock(fd):
                raise RunFolderLocked(_held_message(path, holder, "that process is running"))
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                os.close(fd)
                continue  # replaced in between (its holder released it and another run took it)
            holder = _read_holder(fd)  # as it is now that we hold it
            if holder.get("host") != me["host"]:
                # We cannot see whether a process on another machine is alive: never take it over.
                raise RunFolderLocked(_held_message(path, holder, "this machine cannot tell whether it is "
                                                                  "still running"))
            if _running(int(holder.get("pid", -1)), holder.get("process_start")):
                raise RunFolderLocked(_held_message(path, holder, "that process is running"))
        except BaseException:
            os.close(fd)
            raise
        # Same host, holder process gone (killed: SIGKILL, OOM, a crash): take the lock over in place.
        # We hold the flock on this very file, so no other run can take it over at the same time.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        log.info("%s: took over the lock of pid %s, which is no longer running", folder, holder.get("pid"))
        _held[str(folder)] = (fd, path)
        return True
    raise RunFolderLocked(f"{path} keeps changing hands (many runs starting in {folder}?); rerun into another "
                          f"hydra.run.dir")


def release_lock(folder: str | os.PathLike) -> None:
    entry = _held.pop(os.path.realpath(folder), None)
    if entry is None:
        return
    fd, path = entry
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


@atexit.register
def _release_all() -> None:
    for folder in list(_held):
        release_lock(folder)


# --------------------------------------------------------------------------- folder checks
def check_not_completed(run_dir: Path, resuming: bool, overwrite: Any) -> dict | None:
    """Refuse to start over a completed run (unless `overwrite=true`); return the folder's record."""
    record = _read_record(run_dir / "results.json")
    completed = bool(record and record.get("status") == "completed")
    if completed and not isinstance(overwrite, bool):
        raise RunSetupError(f"overwrite={overwrite!r} must be true or false; {run_dir} holds a completed run, "
                            f"left as it was")
    if completed and not overwrite:
        if resuming:
            raise RunSetupError(f"{run_dir} holds a completed run: there is nothing to resume (its results.json "
                                f"and checkpoint/ are kept). Drop ckpt_path to start elsewhere")
        raise RunSetupError(f"{run_dir} already holds a completed run (results.json, status completed); choose "
                            f"another hydra.run.dir, or pass overwrite=true to replace it")
    return record


def run_identity(cfg: DictConfig) -> dict:
    """What a resume checkpoint must match: the resolved config (secrets redacted), as JSON holds it."""
    return json.loads(json.dumps(redact_secrets(OmegaConf.to_container(cfg, resolve=True)), default=str))


def _refuse_changes(requested: str, old: dict, new: dict, whose: str) -> None:
    # what trains first: a different method, task or model is the change a reader must see
    changed = sorted(config_changes(old, new), key=lambda c: c[0] not in _IDENTITY_KEYS)
    if changed:
        shown = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise RunSetupError(f"ckpt_path={requested}: the resumed run's settings differ from {whose} ({shown}{more}). "
                            f"A resume must repeat the killed run's command; to train with other settings start "
                            f"a new run folder")


def check_run_folder(cfg: DictConfig, run_dir: Path) -> bool:
    """Refuse to start over a completed run, and a resume whose settings differ from the killed
    run's or whose checkpoint does not prove it is that run's, intact. Returns whether
    `overwrite=true` will replace a completed run: the caller removes its outputs
    (`remove_run_outputs`) only once the new run's settings have passed every check."""
    from gem.lit.resume import CheckpointError, verify_checkpoint

    resuming = bool(cfg.get("ckpt_path"))
    overwrite = cfg.get("overwrite", False)
    record = check_not_completed(run_dir, resuming, overwrite)
    replacing = bool(overwrite is True and record and record.get("status") == "completed")
    if not resuming:
        return replacing
    requested = str(cfg.ckpt_path)
    checkpoint = requested_checkpoint(requested, run_dir)
    if not checkpoint.is_file():
        raise RunSetupError(f"ckpt_path={requested}: no checkpoint at {checkpoint}. Resume with the killed run's "
                            f"folder (hydra.run.dir=<its run dir>) and resume_checkpoints.save_last=true")
    if not zipfile.is_zipfile(checkpoint):  # torch.save's format; caught before data and model load
        raise RunSetupError(f"ckpt_path={requested}: {checkpoint} is not a training checkpoint (a torch.save "
                            f"file such as <run dir>/lightning/last.ckpt); ckpt_path=last resumes the run folder's own")
    unverified_ok = cfg.get("resume_unverified", False)
    if not isinstance(unverified_ok, bool):
        raise RunSetupError(f"resume_unverified={unverified_ok!r} must be true or false")
    new = run_identity(cfg)
    try:
        identity = verify_checkpoint(checkpoint, requested, unverified_ok)
    except CheckpointError as error:
        raise RunSetupError(str(error)) from error
    # The killed run's record sits in the checkpoint's run folder (<run dir>/lightning/last.ckpt).
    killed = record if requested == "last" else _read_record(checkpoint.parent.parent / "results.json")
    if killed and "config" in killed:
        _refuse_changes(requested, killed["config"], new, "the killed run's")
    if identity is not None:  # wherever the checkpoint lives (no record beside it), it says which run wrote it
        _refuse_changes(requested, identity, new, "the run that wrote the checkpoint")
    return replacing


def remove_run_outputs(run_dir: Path) -> None:
    """`overwrite=true`, the new run cleared to start: remove the previous run's outputs, so the
    folder never mixes the old run's checkpoint with the new run's record."""
    for name in (*_RUN_OUTPUTS, HYDRA_BACKUP):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def restore_hydra_files(run_dir: Path) -> None:
    """`overwrite=true` refused: put back the completed run's `.hydra/` that Hydra replaced."""
    backup = run_dir / HYDRA_BACKUP
    if backup.is_dir():
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        backup.rename(run_dir / ".hydra")


def requested_checkpoint(requested: str, run_dir: Path) -> Path:
    """`ckpt_path=last` is the run folder's own resume checkpoint; anything else is a path."""
    return run_dir / "lightning" / "last.ckpt" if requested == "last" else Path(requested)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two resolved configs, except what a resume may
    change. A key the old config lacks is new in the code since the killed run started (it
    could not have been set then), so it is not a change."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        if dotted in _RESUME_MAY_CHANGE or key not in old:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, dotted + ".")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            changes.append((dotted, a, b))
    return changes


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no record, or an unreadable one: nothing to protect or compare


# --------------------------------------------------------------------------- secrets
def redact_hydra_output() -> None:
    """Hydra saved the job's config and command-line overrides before the job started: take
    secrets (an API key passed on the command line) out of those files, as out of the record."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or process_rank() != 0:
        return
    hydra_cfg = HydraConfig.get()
    folders = []
    if hydra_cfg.output_subdir is not None:
        folders.append(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        folders.append(Path(hydra_cfg.sweep.dir))  # multirun.yaml
    redact_hydra_files(*folders)


@contextmanager
def redacted_argv():
    """`sys.argv` redacted for the duration: wandb reads it at `wandb.init` and stores it as the
    run's `args` (wandb-metadata.json, the .wandb file that `wandb sync` uploads)."""
    saved = sys.argv
    sys.argv = redact_argv(list(saved))
    try:
        yield
    finally:
        sys.argv = saved


def command_overrides() -> list[str] | None:
    """The job's command-line overrides (secrets redacted, without `ckpt_path`): with them the
    manifest rebuilds the command that makes this run from scratch. Kept in the record because
    Hydra rewrites `.hydra/overrides.yaml` at every start in the folder, a resume's included."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return [redact_override_text(str(o)) for o in HydraConfig.get().overrides.task
            if not str(o).startswith(("ckpt_path=", "resume_unverified="))]


# --------------------------------------------------------------------------- signals
class RunTerminated(SystemExit):
    """SIGTERM or SIGINT ended the run. A SystemExit, so Hydra and Python exit with its code
    (128 + the signal's number, as a shell reports a process killed by it) without a traceback."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(128 + self.signum)

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return (f"terminated by {name} (signal {self.signum}); resume it from its last checkpoint by rerunning "
                f"the same command with hydra.run.dir=<this run dir> ckpt_path=last")


_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def ending_signals():
    """SIGTERM and SIGINT raise `RunTerminated` where the run is (Lightning calls this handler after
    its own SIGTERM notifier during fit), so the record says `terminated` and the exit code is not 0
    (Lightning alone turns SIGTERM into a SystemExit with code 0). Further signals are ignored while
    the record is written; the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _ENDING_SIGNALS}

    def handler(signum, frame):
        for s in _ENDING_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise RunTerminated(signum)

    for s in _ENDING_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _as_terminated(error: BaseException) -> RunTerminated | None:
    if isinstance(error, RunTerminated):
        return error
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    except ImportError:
        return None
    return RunTerminated(signal.SIGTERM) if isinstance(error, SIGTERMException) else None


# --------------------------------------------------------------------------- the record
def new_record(cfg: DictConfig, run_dir: Path, config: dict) -> RunRecord:
    record = RunRecord(run_dir, method=str(cfg.method.name), task=str(cfg.task.name), model=str(cfg.model.name),
                       seed=cfg.get("seed"), config=config)
    record.data["overrides"] = command_overrides()
    record.data["tags"] = [str(tag) for tag in (cfg.get("tags") or [])]
    return record


def config_for_record(cfg: DictConfig) -> dict:
    """The config as resolved as it can be: an unresolvable value (the error's cause) stays as written."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def end_record(record: RunRecord, error: BaseException) -> RunTerminated | None:
    """Finish the record as `terminated` (a signal) or `failed` (an error), with the error and its
    traceback (call inside `except`). Returns the termination, for the caller to raise."""
    record.data["traceback"] = redact_override_text(traceback.format_exc(limit=20))
    terminated = _as_terminated(error)
    if terminated is not None:
        record.finish("terminated", error=str(terminated))
        log.error("%s: %s", record.path.parent, terminated)
        return terminated
    message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    record.finish("failed", error=redact_override_text(message))
    return None


@contextmanager
def open_run(cfg: DictConfig, run_dir: Path, preflight: Callable[[DictConfig], Any]):
    """The run's life cycle around its training: yields (record, whatever `preflight` returned).

    Before anything is written: the lock, then the folder checks (a completed run, or a killed
    run's record when the resume's settings differ, stays as it was), then `preflight` (a refusal
    there leaves a `failed` record, so a refused job of a multirun still shows in the table's
    footer; with `overwrite=true` the completed run stays whole instead)."""
    owns_lock = process_rank() == 0 and acquire_lock(run_dir)
    try:
        with ending_signals():
            redact_hydra_output()
            try:
                replacing = check_run_folder(cfg, run_dir)
            except RunSetupError as error:
                # the console and run.log; the folder's record is untouched
                log.error("refused: %s", redact_override_text(str(error)))
                raise
            try:
                checked = preflight(cfg)
            except BaseException as error:
                if replacing:  # overwrite=true, but the new run cannot start: the completed run stays whole
                    restore_hydra_files(run_dir)
                    error.add_note(f"overwrite=true refused: the completed run in {run_dir} was left as it was")
                    log.error("refused: %s (overwrite=true refused: the completed run in %s was left as it was)",
                              redact_override_text(str(error)), run_dir)
                    raise
                run_dir.mkdir(parents=True, exist_ok=True)
                terminated = end_record(new_record(cfg, run_dir, config_for_record(cfg)), error)
                if terminated is not None and terminated is not error:
                    raise terminated from error
                raise
            if replacing:
                remove_run_outputs(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            record = new_record(cfg, run_dir, checked.config)
            record.write()
            try:
                yield record, checked
                record.finish("completed")
            except BaseException as error:  # record why, then let Hydra/the caller see the error
                terminated = end_record(record, error)
                if terminated is not None and terminated is not error:
                    raise terminated from error  # Lightning's SIGTERM exit has code 0: make it 143
                raise
    finally:
        if owns_lock:
            release_lock(run_dir)
