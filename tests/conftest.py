"""Shared fixtures of the integration tests: the data folder, Hydra composition, in-process runs.

Integration tests compose the real `conf/` tree with Hydra's compose API and call
`gem.train.run(cfg)` in-process (fast), with `paths.output_dir` pointed at a temporary
folder, so `${hydra:runtime.output_dir}` is never needed. What users run as a command
(`python run.py ...`) is exercised with `run_cli` (a subprocess) where the CLI matters.
Everything runs offline (HF_HUB_OFFLINE=1), on the CPU, with tiny models and subsets.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import lightning as L
import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
RUN_PY = REPO / "run.py"
# The shared data folder sits next to the repository: <workspace>/shared/data.
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# A tiny, fast run: the random tiny BERT, small subsets, one epoch, no experiment logger, CPU.
TINY_RUN = [
    "model=tiny-bert",
    "task=rte",
    "task.num_train=32",
    "task.num_dev=16",
    "task.num_test=16",
    "task.max_length=64",
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
]
SPARSE = ["gem", "gem_uniform", "grad_uniform", "grad_entropy", "random_mask", "fish", "pafi"]
ALL_METHODS = ["full", "bitfit", "lora", "adapter", *SPARSE]


def method_overrides(method: str) -> list[str]:
    overrides = [f"method={method}"]
    if method in SPARSE:
        overrides.append("method.num_grad_samples=16")
    return overrides


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data folder {DATA_DIR} is missing")
    return DATA_DIR


def compose(overrides: Iterable[str], output_dir: str | Path | None = None):
    """The run config exactly as `python run.py <overrides>` would build it (minus `hydra`).

    `output_dir` replaces `paths.output_dir` (whose default asks Hydra's runtime for the run folder).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import gem  # noqa: F401  (registers the OmegaConf resolvers the configs use, as run.py does)

    overrides = list(overrides)
    if output_dir is not None:
        overrides.append(f"paths.output_dir={output_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def offline_env(mp: pytest.MonkeyPatch) -> None:
    """No Hub, no wandb upload, no inherited data folder (tests pass data_dir themselves)."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.delenv("GEM_DATA_DIR", raising=False)
    # gem.train.build_logger writes WANDB_MODE / WANDB_SILENT into os.environ; record them
    # here so that the monkeypatch puts the environment back afterwards.
    mp.delenv("WANDB_MODE", raising=False)
    mp.delenv("WANDB_SILENT", raising=False)


class TrainEndProbe(L.Callback):
    """Looks at the end of training at what Lightning optimised: parameter names in the
    optimizer, optimizer-state sizes, the sparse masks, and a CPU copy of the model."""

    def on_train_end(self, trainer, pl_module):
        from gem.tuner import gem_modules

        model = pl_module.model
        for _, layer in gem_modules(model):
            layer.materialize()
        optimizer = trainer.optimizers[0]
        by_id = {id(p): plain_name(n) for n, p in model.named_parameters()}
        self.optimized = [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]
        self.state_numel = {by_id[id(p)]: sum(t.numel() for k, t in state.items() if k != "step")
                            for p, state in optimizer.state.items()}
        self.state_keys = {k for state in optimizer.state.values() for k in state}
        self.masks = {name.removeprefix("base_model.model."): layer.gem_indices["default"].detach().cpu().clone()
                      for name, layer in gem_modules(model)}
        self.params = {plain_name(n): p.detach().cpu().clone() for n, p in model.named_parameters()
                       if ".original_module." not in n}
        self.head = {plain_name(n) for n, _ in model.named_parameters() if pl_module.method._is_head(n)}


def plain_name(name: str) -> str:
    """A parameter's name in the plain base model (PEFT's wrappers taken out; GEM's deltas keep theirs)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def run_in_process(overrides: Iterable[str], output_dir: Path, extra_callbacks: list | None = None) -> dict:
    """Compose and run one configuration in this process; return the finished record.

    `extra_callbacks` join the method's own Lightning callbacks (e.g. a `TrainEndProbe`).
    """
    import gem.train
    from gem.train import run

    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp)
        if extra_callbacks:
            own = gem.train.method_callbacks
            mp.setattr(gem.train, "method_callbacks",
                       lambda *args, **context: [*own(*args, **context), *extra_callbacks])
        cfg = compose(overrides, output_dir)
        return run(cfg)


class MethodRun(NamedTuple):
    record: dict
    run_dir: Path
    cfg: object
    probe: TrainEndProbe


@pytest.fixture(scope="session")
def method_runs(tmp_path_factory, data_dir) -> Callable[[str], MethodRun]:
    """`method_runs(name)`: one tiny RTE run of that method (checkpoint saved), run once per session."""
    cache: dict[str, MethodRun] = {}

    def get(method: str) -> MethodRun:
        if method not in cache:
            out = tmp_path_factory.mktemp(f"run_{method}")
            overrides = [*TINY_RUN, *method_overrides(method), f"data_dir={data_dir}", "save_checkpoint=true"]
            probe = TrainEndProbe()
            record = run_in_process(overrides, out, extra_callbacks=[probe])
            cache[method] = MethodRun(record, out, compose(overrides, out), probe)
        return cache[method]

    return get


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a `python run.py` subprocess: offline, no wandb settings, no data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "GEM_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # The tiny models and the SmolLM2 conversion live in GEM's cache; keep it when HOME moves.
    from gem.models import gem_cache_root

    env.setdefault("GEM_CACHE_DIR", str(gem_cache_root()))
    env.update(extra)
    return env


def run_cli(args: Iterable[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess:
    """`python run.py <args>` with stdin closed (a prompt would read EOF, never hang)."""
    return subprocess.run([sys.executable, str(RUN_PY), *args], cwd=cwd, env=env or cli_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
