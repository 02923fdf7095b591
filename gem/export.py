"""Rebuild a finished run's model from its checkpoint, and export it as a plain Hugging Face model.

    python -m gem.export RUN_DIR --output EXPORT_DIR

The base model comes from the run record's config, the trained part from
`RUN_DIR/checkpoint` (GEM: sparse delta + head; LoRA: peft adapter; ...). GEM deltas and
LoRA fold into the base weights, as do BitFit and full fine-tuning (their trained tensors
replace the base ones); the export then loads with `AutoModel*.from_pretrained`. Adapters
add modules a plain Hugging Face model does not have, so they do not export.

A run folder is data: exporting one (someone else's, say) runs none of its code unless asked.
A record that names `extensions` (Python modules the run imported) is refused without
`--allow-extensions`; one with `model.trust_remote_code=true` (the model repository's own Python
code) without `--trust-remote-code`. The checkpoint is safetensors and JSON, never a pickle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from gem.methods import method_from_config
from gem.models import load_model
from gem.records import RECORD_NAME, read_record


class UntrustedCodeError(ValueError):
    """The run record asks to run code; the user did not allow it on the command line."""


def _check_code_allowed(cfg, run_dir: Path, allow_extensions: bool, trust_remote_code: bool) -> None:
    extensions = cfg.get("extensions")
    names = [extensions] if isinstance(extensions, str) else list(extensions or [])
    if names and not allow_extensions:
        raise UntrustedCodeError(
            f"{run_dir / RECORD_NAME} names extensions {[str(n) for n in names]}: Python modules that exporting "
            f"would import, i.e. run. A run folder is data and runs no code unless you say so: if you trust "
            f"those modules, rerun with --allow-extensions")
    if cfg.model.get("trust_remote_code") and not trust_remote_code:
        raise UntrustedCodeError(
            f"{run_dir / RECORD_NAME} sets model.trust_remote_code=true: loading its model "
            f"({cfg.model.get('pretrained')}) would run Python code from the model's repository. If you trust "
            f"it, rerun with --trust-remote-code")


def load_trained(run_dir: str | Path, allow_extensions: bool = False, trust_remote_code: bool = False):
    """(model with the run's trained state, tokenizer, method, record) for a finished run.

    Code the record names runs only when allowed here (`--allow-extensions`, `--trust-remote-code`)."""
    run_dir = Path(run_dir)
    try:
        record = read_record(run_dir / RECORD_NAME)
    except (OSError, ValueError) as error:
        raise ValueError(f"{run_dir / RECORD_NAME}: cannot read the run record ({error})") from error
    if record.get("status") != "completed":
        raise ValueError(f"{run_dir} holds a run with status {record.get('status')!r}; only completed runs export")
    checkpoint = run_dir / "checkpoint"
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint} is missing: the run was made with save_checkpoint=false")
    cfg = OmegaConf.create(record["config"])
    _check_code_allowed(cfg, run_dir, allow_extensions, trust_remote_code)
    from gem.config import load_extensions

    if allow_extensions:
        load_extensions(cfg.get("extensions"))  # the run's own scores/rules/methods, if it used any

    kind = cfg.task.kind
    num_labels = 1 if kind == "regression" else max(2, len(cfg.task.get("label_names") or []))
    loaded = load_model(cfg.model, kind, num_labels)
    method = method_from_config(cfg)  # as the run built it
    model = method.prepare(loaded.model, loaded.head_parameter_names)
    model = method.load(model, checkpoint)
    return model, loaded.tokenizer, method, record


def export_run(run_dir: str | Path, output_dir: str | Path, force: bool = False, allow_extensions: bool = False,
               trust_remote_code: bool = False) -> Path:
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise FileExistsError(f"{output_dir} is not empty (another export?); choose a new folder or pass --force "
                              f"to write over it")
    model, tokenizer, method, _ = load_trained(run_dir, allow_extensions, trust_remote_code)
    merged = method.merged_model(model)
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run's folder (holds results.json and checkpoint/)")
    parser.add_argument("--output", required=True, help="folder for the merged Hugging Face model")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --output folder")
    parser.add_argument("--allow-extensions", action="store_true",
                        help="import the Python modules the run record names in config.extensions (runs their code)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a record with model.trust_remote_code=true run the model repository's code")
    args = parser.parse_args(argv)
    from gem.methods import MethodError

    try:
        output = export_run(args.run_dir, args.output, force=args.force, allow_extensions=args.allow_extensions,
                            trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, MethodError) as error:
        parser.error(str(error))
    print(f"exported to {output}")


if __name__ == "__main__":
    main()
