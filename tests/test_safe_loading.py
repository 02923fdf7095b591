"""Nothing loads code with the weights, and secrets never reach a record or a log.

* every `torch.load` in the project passes `weights_only=True` (no arbitrary unpickling);
* no module imports pickle (or dill / cloudpickle / joblib): checkpoints are safetensors + JSON;
* `trust_remote_code` is never hard-coded on: every model config sets it false and
  `resolve_model_source` passes it only when a config asks (tests/test_models.py checks the
  kwargs: test_resolve_model_source_kwargs);
* a secret in the environment (WANDB_API_KEY) or in the config (an `api_key` / `token` key)
  appears neither in results.json nor in run.log.
"""

from __future__ import annotations

import ast
import json

import pytest
import yaml

from conftest import CONF_DIR, REPO, TINY_RUN, cli_env, run_cli

SOURCES = sorted([*(REPO / "gem").rglob("*.py"), *(REPO / "experiments").rglob("*.py"), REPO / "run.py"])
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_sources_are_found():
    assert REPO / "gem" / "core" / "delta.py" in SOURCES and REPO / "experiments" / "benchmark.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_deserialisation(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
        else:
            continue
        assert not names & UNSAFE_MODULES, f"{path}:{node.lineno} imports {sorted(names & UNSAFE_MODULES)}"
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            assert "load" not in {alias.name for alias in node.names}, f"{path}:{node.lineno}: use torch.load(...)"
    for call in _calls(tree):
        flags = {kw.arg: kw.value for kw in call.keywords}
        if _dotted(call.func) == "torch.load":
            value = flags.get("weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, \
                f"{path}:{call.lineno}: torch.load without weights_only=True"
        for key in ("trust_remote_code", "allow_pickle"):  # never hard-coded on
            value = flags.get(key)
            assert not (isinstance(value, ast.Constant) and value.value is True), \
                f"{path}:{call.lineno}: {key}=True hard-coded"


def test_model_configs_keep_remote_code_off():
    configs = sorted((CONF_DIR / "model").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        assert cfg.get("trust_remote_code", False) is False, path.name


def test_remote_code_only_when_the_config_asks():
    from gem.models import resolve_model_source
    from gem.models.tiny import TINY_BERT_CFG

    _, kwargs = resolve_model_source(dict(TINY_BERT_CFG))
    assert "trust_remote_code" not in kwargs
    cfg = {k: v for k, v in TINY_BERT_CFG.items() if k != "trust_remote_code"}
    _, kwargs = resolve_model_source(cfg)
    assert "trust_remote_code" not in kwargs


SECRET = "secret-xyz"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_secrets_never_reach_the_record_or_the_log(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    env = cli_env(WANDB_API_KEY=SECRET, HOME=str(tmp_path))
    proc = run_cli([*TINY_RUN, "method=bitfit", "save_checkpoint=false", f"data_dir={data_dir}",
                    f"+logger.api_key={SECRET}", f"+hub_token={SECRET}", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record_text = (run_dir / "results.json").read_text()
    record = json.loads(record_text)
    assert record["status"] == "completed"
    assert SECRET not in record_text
    assert record["config"]["logger"]["api_key"] == "<redacted>"
    assert record["config"]["hub_token"] == "<redacted>"
    log_text = (run_dir / "run.log").read_text()
    assert "[bitfit] rte | tiny-bert" in log_text  # the log is the run's own, and it was written
    assert SECRET not in log_text
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    # Hydra's own copies of the config and the command line, rewritten before training
    hydra_files = sorted((run_dir / ".hydra").glob("*.yaml"))
    assert {f.name for f in hydra_files} >= {"config.yaml", "hydra.yaml", "overrides.yaml"}
    for path in hydra_files:
        assert SECRET not in path.read_text(), path.name
    assert "+logger.api_key=<redacted>" in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_redaction_of_hydra_files_covers_overrides_dirnames_and_config_keys(tmp_path):
    from gem.records import redact_hydra_files, redact_override_text

    assert redact_override_text("+logger.api_key=abc") == "+logger.api_key=<redacted>"
    assert (redact_override_text("method=gem,hub_token=abc,seed=1")
            == "method=gem,hub_token=<redacted>,seed=1")
    assert redact_override_text("task=rte") == "task=rte"
    (tmp_path / "overrides.yaml").write_text("- task=rte\n- +logger.api_key=abc\n")
    (tmp_path / "config.yaml").write_text("logger:\n  api_key: abc\n  name: csv\n")
    (tmp_path / "hydra.yaml").write_text("hydra:\n  job:\n    override_dirname: +logger.api_key=abc,task=rte\n")
    (tmp_path / "clean.yaml").write_text("# a comment stays\ntask: rte\n")
    rewritten = redact_hydra_files(tmp_path)
    assert {p.name for p in rewritten} == {"overrides.yaml", "config.yaml", "hydra.yaml"}
    for path in tmp_path.glob("*.yaml"):
        assert "abc" not in path.read_text()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"logger": {"api_key": "<redacted>", "name": "csv"}}
    assert (tmp_path / "clean.yaml").read_text().startswith("# a comment stays")  # untouched


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_multirun_keeps_secrets_out_of_the_sweep_files(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY_RUN, "method=bitfit", "save_checkpoint=false", f"data_dir={data_dir}",
                    f"+logger.api_key={SECRET}", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=cli_env(HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert any(p.name == "multirun.yaml" for p in files) and any(p.name == "results.json" for p in files)
    leaking = [str(p.relative_to(sweep)) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaking


def test_settings_named_like_tokens_are_not_secrets():
    from gem.records import redact_override_text, redact_secrets

    assert redact_override_text("task.generation.max_new_tokens=50") == "task.generation.max_new_tokens=50"
    assert redact_override_text("a=1,hf_token=xyz,model.pad_token_id=0") == "a=1,hf_token=<redacted>,model.pad_token_id=0"
    assert redact_secrets({"generation": {"max_new_tokens": 50}, "pad_token_id": 0, "eos_token": "</s>",
                           "auth_token": "x", "wandb": {"apikey": "y"}}) == \
        {"generation": {"max_new_tokens": 50}, "pad_token_id": 0, "eos_token": "</s>", "auth_token": "<redacted>",
         "wandb": {"apikey": "<redacted>"}}
