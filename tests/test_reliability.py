"""Reliability, round two (issue 16): sweeps never lose or mix runs, records never run code or leak
secrets, checkpoints prove what they are, signals leave an honest record.

One section per numbered point of the issue, each reproducing the failure (the assertion that
failed on the code before the fix) and then the hostile variations around it:

1. one run, one folder, one writer (the lock; folder names that cannot collide)
2. reading a record never runs code (export, tables, figures, manifest)
3. secrets, by key name and by value, in every file of a run folder (wandb's included)
4. a checkpoint from another run is refused, wherever it lives
5. a corrupted checkpoint is refused (checksum)
6. SIGTERM / SIGINT: `terminated` record, exit 128 + signal, resumable
7. Lightning's load is weights-only whatever torch's default says
8. the smaller items: max_length, overwrite=yes, data file errors, the LR, the sandbox's PID namespace
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, RUN_PY, TINY_RUN, cli_env, compose, run_cli, run_in_process
from test_bad_input import fails_in_process, rte_rows, tiny, write_rte

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# A tiny run that keeps its resume checkpoint (and its sidecar) after success.
KEEP = ["resume_checkpoints.keep_after_success=true"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# A process that holds a folder's lock until its stdin closes (another run, as far as the folder knows).
_HOLDER = """
import sys
from gem.run_folder import acquire_lock
acquire_lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


class _Holder:
    def __init__(self, folder: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started_at": "then", **holder}))
    return path


# =========================================================================== 1. one folder, one writer
def test_a_second_run_into_a_folder_in_use_is_refused_and_writes_nothing(tmp_path, data_dir):
    # Before: both runs wrote .hydra/, run.log and results.json into the folder and exited 0.
    out = tmp_path / "run"
    with _Holder(out) as holder:
        before = _files(out)
        proc = run_cli([*tiny(data_dir, "method=bitfit"), f"hydra.run.dir={out}"], cwd=tmp_path, timeout=120)
        assert proc.returncode == 75, proc.stderr[-2000:]
        assert f"pid {holder.proc.pid} on host {socket.gethostname()}" in proc.stderr
        assert "choose another hydra.run.dir" in proc.stderr
        assert _files(out) == before  # no .hydra/, no run.log, no record: only the holder's lock
    assert not (out / ".lock").exists()  # the holder released it on exit


def test_two_runs_started_together_into_one_folder_one_runs_one_is_refused(tmp_path, data_dir):
    out = tmp_path / "run"
    args = [sys.executable, str(RUN_PY), *tiny(data_dir, "method=bitfit"), f"hydra.run.dir={out}"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 75], [r[2][-1500:] for r in results]
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "completed"
    log = (out / "run.log").read_text()
    assert log.count("[bitfit] rte | tiny-bert") == 1  # one run's log, not two interleaved
    assert not (out / ".lock").exists()


def test_two_sweeps_into_one_sweep_folder_the_second_is_refused_before_writing(tmp_path):
    sweep = tmp_path / "sweep"
    with _Holder(sweep):
        proc = run_cli(["-m", "model=tiny-bert", "logger=none", "seed=1,2", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, timeout=120)
        assert proc.returncode == 75 and "is in use by another run" in proc.stderr
        assert sorted(p.name for p in sweep.iterdir()) == [".lock"]  # no multirun.yaml, no job folder


def test_default_run_folders_cannot_collide_within_a_second_or_across_array_tasks(monkeypatch):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    def run_dir() -> str:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=["model=tiny-bert"], return_hydra_config=True)
            return str(OmegaConf.select(cfg, "hydra.run.dir")), str(OmegaConf.select(cfg, "hydra.sweep.dir"))

    folders = {run_dir() for _ in range(5)}  # within one second, as a sweep script would
    assert len({f[0] for f in folders}) == 5 and len({f[1] for f in folders}) == 5
    name = Path(next(iter(folders))[0]).name
    assert name.split("_s1_")[0].count("-") == 4  # <date>_<time>_s<seed>_<suffix>: the readable prefix stays
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "17")
    assert "_s1_a17-" in run_dir()[0]


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, data_dir):
    # A run killed with SIGKILL leaves its lock behind; the resume (or a rerun) takes it over.
    out = tmp_path / "run"
    _write_lock(out)
    record = run_in_process(tiny(data_dir, "method=bitfit"), out)
    assert record["status"] == "completed" and not (out / ".lock").exists()


def test_a_lock_from_another_host_is_refused_naming_the_host_and_the_fix(tmp_path, data_dir):
    from gem.run_folder import RunFolderLocked

    out = tmp_path / "run"
    lock = _write_lock(out, host="gpu-node-17", pid=4242)
    with pytest.raises(RunFolderLocked, match=r"pid 4242 on host gpu-node-17.*cannot tell whether it is still "
                                              r"running.*delete \S*\.lock and rerun"):
        run_in_process(tiny(data_dir, "method=bitfit"), out)
    assert sorted(p.name for p in out.iterdir()) == [".lock"] and json.loads(lock.read_text())["pid"] == 4242


def test_a_lock_whose_pid_was_reused_by_another_process_is_stale(tmp_path):
    from gem.run_folder import _process_start, acquire_lock, release_lock

    if _process_start(os.getpid()) is None:
        pytest.skip("no /proc: process start times unknown")
    folder = tmp_path / "run"
    _write_lock(folder, pid=os.getppid(), process_start="1")  # a live pid, but not the process that locked
    assert acquire_lock(folder)
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    release_lock(folder)
    assert not (folder / ".lock").exists()


def test_a_live_holder_is_respected_even_when_its_lock_file_was_edited(tmp_path):
    # The flock decides on this host: a lock file rewritten to name a dead pid is still held.
    from gem.run_folder import RunFolderLocked, acquire_lock

    folder = tmp_path / "run"
    with _Holder(folder):
        (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
        with pytest.raises(RunFolderLocked, match="that process is running"):
            acquire_lock(folder)


def test_the_lock_is_released_when_a_run_fails_and_is_reentrant_in_one_process(tmp_path, data_dir):
    from gem.run_folder import acquire_lock, release_lock

    out = tmp_path / "run"
    with pytest.raises(Exception, match=r"density=2 \(method\.density\) is impossible"):
        run_in_process(tiny(data_dir, "method=gem", "method.density=2"), out)
    assert not (out / ".lock").exists()
    assert acquire_lock(out) and not acquire_lock(out)  # this process holds it: no self-refusal
    assert not acquire_lock(out.parent / "x" / ".." / out.name)  # nor when the path is spelled otherwise
    release_lock(out)
    assert not (out / ".lock").exists()


# =========================================================================== 2. records never run code
_EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture()
def shared_run(method_runs, tmp_path, monkeypatch):
    """A completed bitfit run, copied; its record names an extension module that, when imported,
    leaves a marker file (someone else's shared results folder)."""
    run = tmp_path / "shared"
    shutil.copytree(method_runs("bitfit").run_dir, run)
    modules = tmp_path / "modules"
    modules.mkdir()
    marker = tmp_path / "marker"
    (modules / "evil_ext_16.py").write_text(_EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(modules))
    record = json.loads((run / "results.json").read_text())
    record["config"]["extensions"] = ["evil_ext_16"]
    (run / "results.json").write_text(json.dumps(record))
    yield run, marker
    sys.modules.pop("evil_ext_16", None)


def test_export_does_not_import_the_extensions_a_record_names(shared_run, tmp_path, capsys):
    from gem.export import main

    run, marker = shared_run
    with pytest.raises(SystemExit):
        main([str(run), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert "names extensions ['evil_ext_16']" in err and "--allow-extensions" in err
    assert not marker.exists() and "evil_ext_16" not in sys.modules  # before: the module ran
    main([str(run), "--output", str(tmp_path / "hf"), "--allow-extensions"])  # the user's explicit choice
    assert marker.read_text() == "ran" and (tmp_path / "hf" / "config.json").is_file()


def test_export_does_not_trust_remote_code_because_a_record_says_so(method_runs, tmp_path, capsys):
    from gem.export import main

    run = tmp_path / "shared"
    shutil.copytree(method_runs("bitfit").run_dir, run)
    record = json.loads((run / "results.json").read_text())
    record["config"]["model"]["trust_remote_code"] = True
    (run / "results.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit):
        main([str(run), "--output", str(tmp_path / "hf")])
    assert "model.trust_remote_code=true" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_tables_figures_and_manifest_import_nothing_a_record_names(shared_run, tmp_path, capsys):
    from gem import figures, manifest, tables

    run, marker = shared_run
    assert tables.main([str(run)]) == 0
    assert manifest.main([str(run)]) == 0
    try:
        figures.main(["density", str(run), "--output", str(tmp_path / "d.png")])
    except SystemExit:  # a bitfit record has no density to draw; what matters is what it imported
        pass
    assert not marker.exists() and "evil_ext_16" not in sys.modules


# =========================================================================== 3. secrets
# Planted where a user would put them: under innocent keys, in the run name, as tokens of the common services.
PLANTED = {
    "hf": "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ",
    "wandb": "0f1e2d3c4b5a69788796a5b4c3d2e1f001234567",
    "github": "ghp_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe9Dc8",
    "aws": "AKIA" + "QWERTYUIOPASDFGH",
    "slack": "xoxb-" + "123456789012-abcdefABCDEF",
    "random": "Jq8vT2mXw9Lr4Kp7Zs1Nc6Hd3Fb5",
    "password": "correct-horse-battery",
}


@pytest.mark.filterwarnings("ignore")
def test_no_planted_secret_reaches_any_file_of_the_run_folder_wandb_included(tmp_path, data_dir):
    # Before: the command line sat in plain text in wandb's run files, and `+credentials=`,
    # `+wandb_key=` or an `hf_...` value under an innocent key reached results.json and .hydra/.
    run_dir = tmp_path / "run"
    overrides = [f"+credentials={PLANTED['password']}", f"+wandb_key={PLANTED['wandb']}", f"+note={PLANTED['hf']}",
                 f"+misc={PLANTED['random']}", f"+aws={PLANTED['aws']}", f"+chat={PLANTED['slack']}",
                 f"logger.name=run-{PLANTED['github']}"]
    args = [o for o in TINY_RUN if o != "logger=none"] + ["logger=wandb", "method=bitfit", f"data_dir={data_dir}",
                                                          *KEEP, *overrides, f"hydra.run.dir={run_dir}"]
    proc = run_cli(args, cwd=tmp_path, env=cli_env(WANDB_MODE="offline", HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    run_file = next(p for p in files if p.name.endswith(".wandb"))  # what `wandb sync` uploads
    leaks = [(name, str(p.relative_to(run_dir))) for p in files for name, value in PLANTED.items()
             if value.encode() in p.read_bytes()]
    assert not leaks
    for output in (proc.stdout, proc.stderr):
        assert not [name for name, value in PLANTED.items() if value in output]
    record = json.loads((run_dir / "results.json").read_text())
    # our own hashes are not secrets: they stay
    assert record["git_commit"] and len(record["git_commit"].split("+")[0]) == 40
    sidecar = (run_dir / "lightning" / "last.ckpt.sha256").read_text().split()[0]
    assert len(sidecar) == 64 and int(sidecar, 16) >= 0
    assert record["config"]["note"] == "<redacted>" and record["config"]["credentials"] == "<redacted>"
    stored = run_file.read_bytes()  # the command line wandb keeps (its `args`), redacted, not dropped
    assert b"+note=<redacted>" in stored and b"method=bitfit" in stored


@pytest.mark.parametrize("text,expected", [
    ("+note=" + PLANTED["hf"], "+note=<redacted>"),
    ("+x=" + PLANTED["wandb"], "+x=<redacted>"),
    ("model.revision=" + PLANTED["wandb"], "model.revision=" + PLANTED["wandb"]),  # a revision is a hash, not a key
    ("+misc=" + PLANTED["random"], "+misc=<redacted>"),
    ("+url=https://user:" + PLANTED["github"] + "@example.com", "+url=https://user:<redacted>@example.com"),
    ("method=gem,+t=" + PLANTED["slack"] + ",seed=1", "method=gem,+t=<redacted>,seed=1"),
    ("+my_password=hunter2", "+my_password=<redacted>"),
    ("+auth=abc", "+auth=<redacted>"),
    ("model.pretrained=TinyLlama/TinyLlama-1.1B-Chat-v1.0", "model.pretrained=TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    ("data_dir=/data/x7Hq2Lm9Zp4Kw8Rt3Nv6Bc1Df5", "data_dir=/data/x7Hq2Lm9Zp4Kw8Rt3Nv6Bc1Df5"),  # a path
    ("task.generation.max_new_tokens=50", "task.generation.max_new_tokens=50"),
    ("sk-" + "proj-abcdefghijklmnopqrstuvwx1234", "<redacted>"),
])
def test_redaction_by_value_pattern_and_what_stays(text, expected):
    from gem.records import redact_override_text

    assert redact_override_text(text) == expected


@pytest.mark.parametrize("group", ["model", "task", "method"])
def test_no_setting_of_ours_looks_like_a_secret(group):
    # Redaction by value must not eat the configs' own values (model ids, paths, prompts).
    from omegaconf import OmegaConf

    from gem.records import redact_secrets

    names = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml") if not p.stem.startswith("_"))
    assert names
    for name in names:
        cfg = OmegaConf.to_container(compose(["model=tiny-bert", f"{group}={name}", "paths.output_dir=/tmp/x"]),
                                     resolve=True)
        assert redact_secrets(cfg) == cfg, name


def test_a_secret_inside_an_error_message_is_redacted_in_the_record(tmp_path, data_dir):
    from gem.run_checks import RunSetupError

    out = tmp_path / "run"
    with pytest.raises(RunSetupError):
        run_in_process(tiny(data_dir, "method=bitfit", f"optim.lr={PLANTED['hf']}"), out)
    text = (out / "results.json").read_text()
    assert PLANTED["hf"] not in text and "optim.lr='<redacted>' must be a finite number" in text


# =========================================================================== 4, 5, 7. checkpoints
@pytest.fixture(scope="module")
def kept_checkpoint(tmp_path_factory, data_dir):
    """A bitfit RTE run's resume checkpoint (and sidecar), moved away from its run folder's record."""
    out = tmp_path_factory.mktemp("ckpt_run") / "run"
    run_in_process(tiny(data_dir, "method=bitfit", *KEEP), out)
    return out / "lightning"


def _copy_checkpoint(kept: Path, where: Path) -> Path:
    where.mkdir(parents=True)
    for name in ("last.ckpt", "last.ckpt.sha256"):
        shutil.copy(kept / name, where / name)
    return where / "last.ckpt"


def test_a_checkpoint_from_another_task_is_refused_wherever_it_lives(kept_checkpoint, tmp_path, data_dir):
    # Before: an RTE checkpoint given to an SST-2 run resumed and completed as an SST-2 record,
    # because the settings check only looked for a results.json two folders above the checkpoint.
    from gem.run_checks import RunSetupError

    ckpt = _copy_checkpoint(kept_checkpoint, tmp_path / "downloads")
    out = tmp_path / "sst2"
    args = [o.replace("task=rte", "task=sst2") for o in tiny(data_dir, "method=bitfit", *KEEP)]
    with pytest.raises(RunSetupError, match=r"differ from the run that wrote the checkpoint \(task\.name: 'rte' -> "
                                            r"'sst2'"):
        run_in_process([*args, f"ckpt_path={ckpt}"], out)
    assert not out.exists() or not (out / "results.json").exists()  # refused before any record


@pytest.mark.parametrize("change,named", [("seed=2", "seed: 1 -> 2"), ("method=full", "method.name: 'bitfit' -> 'full'"),
                                          ("task.num_train=31", "task.num_train: 32 -> 31"),
                                          ("model.name=other", "model.name: 'tiny-bert' -> 'other'")])
def test_a_checkpoint_whose_identity_differs_is_refused_naming_what_differs(kept_checkpoint, tmp_path, data_dir,
                                                                            change, named):
    from gem.run_checks import RunSetupError

    ckpt = _copy_checkpoint(kept_checkpoint, tmp_path / "elsewhere")
    with pytest.raises(RunSetupError, match=named.replace("(", r"\(").replace(".", r"\.")):
        run_in_process([*tiny(data_dir, "method=bitfit", *KEEP), change, f"ckpt_path={ckpt}"], tmp_path / "run")


def test_the_same_run_resumes_from_a_checkpoint_in_another_folder(kept_checkpoint, tmp_path, data_dir):
    ckpt = _copy_checkpoint(kept_checkpoint, tmp_path / "elsewhere")
    record = run_in_process([*tiny(data_dir, "method=bitfit", *KEEP), f"ckpt_path={ckpt}"], tmp_path / "run")
    assert record["status"] == "completed" and record["resumed_from"] == str(ckpt)


def _largest_tensor_offset(path: Path) -> tuple[int, int]:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
        with open(path, "rb") as handle:  # the local header: 30 bytes + name + extra, then the data
            handle.seek(info.header_offset + 26)
            name_len, extra_len = (int.from_bytes(handle.read(2), "little") for _ in range(2))
        return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_a_corrupted_checkpoint_is_refused_even_when_unverified_resumes_are_allowed(kept_checkpoint, tmp_path,
                                                                                     data_dir):
    # Before: 4 KB flipped inside the largest tensor, and the run resumed on corrupted embeddings.
    from gem.run_checks import RunSetupError

    ckpt = _copy_checkpoint(kept_checkpoint, tmp_path / "elsewhere")
    start, size = _largest_tensor_offset(ckpt)
    data = bytearray(ckpt.read_bytes())
    middle = start + size // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    ckpt.write_bytes(bytes(data))
    for unverified in ("false", "true"):
        with pytest.raises(RunSetupError, match=r"does not match its checksum"):
            run_in_process([*tiny(data_dir, "method=bitfit", *KEEP), f"ckpt_path={ckpt}",
                            f"resume_unverified={unverified}"], tmp_path / f"run_{unverified}")


def test_a_truncated_checkpoint_is_refused(kept_checkpoint, tmp_path, data_dir):
    from gem.run_checks import RunSetupError

    ckpt = _copy_checkpoint(kept_checkpoint, tmp_path / "elsewhere")
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size - 1000])
    with pytest.raises(RunSetupError, match=r"not a training checkpoint|does not match its checksum"):
        run_in_process([*tiny(data_dir, "method=bitfit", *KEEP), f"ckpt_path={ckpt}"], tmp_path / "run")


def test_a_checkpoint_from_before_identities_is_refused_with_how_to_resume_it_anyway(kept_checkpoint, tmp_path,
                                                                                     data_dir):
    from gem.lit.resume import IDENTITY_KEY, file_sha256
    from gem.run_checks import RunSetupError

    ckpt = _copy_checkpoint(kept_checkpoint, tmp_path / "old")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    del checkpoint[IDENTITY_KEY]
    torch.save(checkpoint, ckpt)
    sidecar = Path(str(ckpt) + ".sha256")
    sidecar.unlink()  # as written before this change: neither checksum nor identity
    args = [*tiny(data_dir, "method=bitfit", *KEEP), f"ckpt_path={ckpt}"]
    with pytest.raises(RunSetupError, match=r"has no checksum file.*resume_unverified=true"):
        run_in_process(args, tmp_path / "run")
    sidecar.write_text(file_sha256(ckpt) + "  last.ckpt\n")  # a checksum, but still no identity
    with pytest.raises(RunSetupError, match=r"carries no run identity.*resume_unverified=true"):
        run_in_process(args, tmp_path / "run")
    record = run_in_process([*args, "resume_unverified=true"], tmp_path / "run")  # the explicit way
    assert record["status"] == "completed"


def test_a_checkpoint_whose_sidecar_rename_was_interrupted_still_verifies(kept_checkpoint, tmp_path):
    # Killed between the checkpoint's rename and its sidecar's: the new checksum is still in .partial.sha256.
    from gem.lit.resume import verify_checkpoint

    ckpt = _copy_checkpoint(kept_checkpoint, tmp_path / "torn")
    sidecar = Path(str(ckpt) + ".sha256")
    sidecar.rename(ckpt.with_name("last.ckpt.partial.sha256"))
    sidecar.write_text("0" * 64 + "  last.ckpt\n")  # the previous checkpoint's sum
    assert verify_checkpoint(ckpt, "x")["task"]["name"] == "rte"


def test_every_resume_checkpoint_write_leaves_a_matching_checksum(kept_checkpoint):
    from gem.lit.resume import IDENTITY_KEY, file_sha256

    ckpt = kept_checkpoint / "last.ckpt"
    assert (kept_checkpoint / "last.ckpt.sha256").read_text().split()[0] == file_sha256(ckpt)
    identity = json.loads(torch.load(ckpt, map_location="cpu", weights_only=True)[IDENTITY_KEY])
    assert identity["task"]["name"] == "rte" and identity["method"]["name"] == "bitfit" and identity["seed"] == 1
    assert not list(kept_checkpoint.glob("*.partial*"))


# A checkpoint that runs code when unpickled without weights_only (as torch.load did by default before 2.6).
_CRAFT = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
checkpoint = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
checkpoint["payload"] = Payload()
torch.save(checkpoint, sys.argv[1])
"""


def test_a_crafted_checkpoint_runs_no_code_even_when_torch_defaults_to_full_unpickling(kept_checkpoint, tmp_path,
                                                                                       data_dir):
    # Before: with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, Lightning's load inside trainer.fit ran the payload.
    from gem.lit.resume import file_sha256

    ckpt = _copy_checkpoint(kept_checkpoint, tmp_path / "crafted")
    marker = tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", _CRAFT, str(ckpt), str(marker)], check=True, cwd=REPO)
    Path(str(ckpt) + ".sha256").write_text(file_sha256(ckpt) + "  last.ckpt\n")  # even a consistent sidecar
    env = cli_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    proc = run_cli([*tiny(data_dir, "method=bitfit", *KEEP), f"ckpt_path={ckpt}", "resume_unverified=true",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env)
    assert proc.returncode != 0 and not marker.exists()
    assert "weights-only" in proc.stderr or "Weights only load failed" in proc.stderr


def test_lightnings_own_load_is_weights_only_even_if_our_checks_were_bypassed(kept_checkpoint, tmp_path, data_dir,
                                                                             monkeypatch):
    # Our verification already refuses the crafted file (it loads weights-only itself); this pins
    # the second line of defence: trainer.fit(..., weights_only=True).
    import gem.lit.resume

    ckpt = _copy_checkpoint(kept_checkpoint, tmp_path / "crafted")
    marker = tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", _CRAFT, str(ckpt), str(marker)], check=True, cwd=REPO)
    monkeypatch.setattr(gem.lit.resume, "verify_checkpoint", lambda *a, **k: None)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        run_in_process([*tiny(data_dir, "method=bitfit", *KEEP), f"ckpt_path={ckpt}"], tmp_path / "run")
    assert not marker.exists()


# =========================================================================== 6. signals
# run.py, except that right after the resume checkpoint of step DIE_AT is written, the process
# sends itself SIG (as a scheduler would): handlers run.
_SIGNALS_AFTER_CHECKPOINT = """
import os, runpy, signal, sys
sys.path.insert(0, os.path.dirname(sys.argv[3]))  # run.py's folder first, as `python run.py` has it
from gem.lit.resume import ResumeCheckpoint
save, die_at, sig = ResumeCheckpoint.save, int(sys.argv[1]), getattr(signal, sys.argv[2])
def save_then_signal(self, trainer):
    save(self, trainer)
    if trainer.global_step == die_at:
        os.kill(os.getpid(), sig)
ResumeCheckpoint.save = save_then_signal
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigterm_mid_epoch_leaves_a_terminated_record_exits_non_zero_and_resumes_to_the_same_result(tmp_path,
                                                                                                     data_dir):
    # Before: SIGTERM exited with code 0, leaving a `failed` record with an empty error.
    from test_resume import RESUMABLE, _assert_same_run

    args = [*RESUMABLE, f"data_dir={data_dir}"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run_cli([*args, f"hydra.run.dir={whole}"], cwd=tmp_path).returncode == 0
    proc = subprocess.run([sys.executable, "-c", _SIGNALS_AFTER_CHECKPOINT, "5", "SIGTERM", str(RUN_PY), *args,
                           f"hydra.run.dir={stopped}"], cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    record = json.loads((stopped / "results.json").read_text())
    assert record["status"] == "terminated" and "terminated by SIGTERM (signal 15)" in record["error"]
    assert "ckpt_path=last" in record["error"] and "terminated by SIGTERM" in proc.stdout + proc.stderr
    assert not (stopped / ".lock").exists()
    resumed = run_cli([*args, f"hydra.run.dir={stopped}", "ckpt_path=last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(whole, stopped)


def test_sigint_in_process_ends_with_a_terminated_record_and_code_130(tmp_path, data_dir, monkeypatch):
    from gem.lit.resume import ResumeCheckpoint

    save = ResumeCheckpoint.save

    def save_then_sigint(self, trainer):
        save(self, trainer)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ResumeCheckpoint, "save", save_then_sigint)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        run_in_process(tiny(data_dir, "method=bitfit"), out)
    assert info.value.code == 130
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "terminated" and "SIGINT" in record["error"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    assert not (out / ".lock").exists()


def test_sigterm_before_training_while_data_loads_is_terminated_too(tmp_path, data_dir, monkeypatch):
    import gem.train

    load = gem.train.load_task

    def load_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*args, **kwargs)

    monkeypatch.setattr(gem.train, "load_task", load_then_sigterm)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        run_in_process(tiny(data_dir, "method=bitfit"), out)
    assert info.value.code == 143
    assert json.loads((out / "results.json").read_text())["status"] == "terminated"


def test_sigterm_from_outside_at_any_moment_is_never_a_success(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(RUN_PY), *tiny(data_dir, "method=gem", "method.num_grad_samples=16"),
                             f"hydra.run.dir={out}"], cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not (out / "results.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-2000:]
    assert json.loads((out / "results.json").read_text())["status"] == "terminated"
    assert not (out / ".lock").exists()


# =========================================================================== 8. the smaller items
@pytest.mark.parametrize("override,pattern", [
    ("task.max_length=1", r"task\.max_length=1 must be at least 8"),
    ("optim.lr=-0.001", r"optim\.lr=-0\.001 must be positive for method bitfit"),
    ("optim.lr=0", r"optim\.lr=0 must be positive"),
    ("overwrite=yes", r"overwrite='yes' must be true or false"),
])
def test_impossible_settings_fail_before_anything_loads_naming_the_setting(override, pattern, tmp_path, data_dir,
                                                                           monkeypatch):
    # Before: max_length=1 truncated nothing; a negative LR failed after the model loaded, not naming optim.lr.
    import gem.train
    from gem.run_checks import RunSetupError

    monkeypatch.setattr(gem.train, "load_task", lambda *a, **k: pytest.fail("data loaded before the check"))
    monkeypatch.setattr(gem.train, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    fails_in_process(tiny(data_dir, "method=bitfit", override), tmp_path / "run", RunSetupError, pattern)


def test_a_decoder_max_length_too_small_is_named(tmp_path, data_dir):
    from gem.run_checks import RunSetupError

    fails_in_process(tiny(data_dir, "method=bitfit", "model=tiny-llama", "model.max_length=2"), tmp_path / "run",
                     RunSetupError, r"model\.max_length=2 must be at least 8")


def test_a_method_that_trains_nothing_may_have_lr_zero():
    from gem.run_checks import check_learning_rate

    cfg = compose(["method=zero_shot"])
    assert cfg.optim.lr == 0.0
    check_learning_rate(cfg, trains=False)


def test_a_refused_overwrite_yes_keeps_the_completed_record_and_says_so_in_the_log(tmp_path, data_dir):
    out = tmp_path / "run"
    assert run_cli([*tiny(data_dir, "method=bitfit"), f"hydra.run.dir={out}"], cwd=tmp_path).returncode == 0
    record = (out / "results.json").read_bytes()
    proc = run_cli([*tiny(data_dir, "method=bitfit"), "overwrite=yes", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "overwrite='yes' must be true or false" in proc.stdout  # the console (Hydra's log handler)
    assert "refused: overwrite='yes' must be true or false" in (out / "run.log").read_text()
    assert (out / "results.json").read_bytes() == record


def _write_sst2(root: Path, train: bytes) -> Path:
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    rows = b"".join(b"a sentence number %d\t%d\n" % (i, i % 2) for i in range(20))
    (folder / "dev.tsv").write_bytes(b"sentence\tlabel\n" + rows)
    (folder / "train.tsv").write_bytes(train)
    return root


@pytest.mark.parametrize("bad_line,pattern", [
    (b"caf\xe9 au lait\t1\n", r"line 5 holds a byte that is not UTF-8 \(0xe9 at byte \d+\)"),
    (b"an extra\tcolumn\t1\n", r"line 5 has 3 tab-separated fields but the header has 2 \(an extra column"),
])
def test_data_file_errors_name_the_cause_and_the_line(bad_line, pattern, tmp_path):
    # Before: "An error occurred while generating the dataset", nothing more.
    from gem.data import DataError

    rows = [b"a sentence number %d\t%d\n" % (i, i % 2) for i in range(20)]
    rows.insert(3, bad_line)
    data = _write_sst2(tmp_path / "data", b"sentence\tlabel\n" + b"".join(rows))
    args = [o.replace("task=rte", "task=sst2") for o in tiny(data, "method=bitfit")]
    fails_in_process(args, tmp_path / "run", DataError, r"could not read \S*train\.tsv as tsv", pattern)


def test_the_sandbox_sees_no_host_process(tmp_path):
    # Before: a sample could read /proc/<pid>/cmdline of every host process.
    from gem.sandbox import isolation_report, run_untrusted

    report = isolation_report(refresh=True)
    if str(report.get("pid", "")).startswith("shared") or os.geteuid() != 0:
        pytest.skip(f"the kernel refuses a PID namespace here: {report.get('pid')} (the report says so)")
    code = "import os\nvisible = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
    result = run_untrusted(code, ["assert visible == [1], visible", "assert os.getpid() == 1"])
    assert result.passed, result.detail
    peek = run_untrusted(f"text = open('/proc/{os.getpid()}/cmdline').read()", ["assert True"])
    assert not peek.passed and "No such file" in peek.detail
    assert "pid=pidns" in result.detail
