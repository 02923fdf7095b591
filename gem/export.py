"""Rebuild a finished run's model from its checkpoint, and export it as a plain Hugging Face model.

    python -m gem.export RUN_DIR --output EXPORT_DIR

The base model comes from the run record's config, the trained part from
`RUN_DIR/checkpoint` (GEM: sparse delta + head; LoRA: peft adapter; ...). GEM deltas and
LoRA fold into the base weights; the export then loads with `AutoModel*.from_pretrained`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from gem.methods import build_method
from gem.models import load_model
from gem.records import RECORD_NAME, read_record


def load_trained(run_dir: str | Path):
    """(model with the run's trained state, tokenizer, method, record) for a finished run."""
    run_dir = Path(run_dir)
    record = read_record(run_dir / RECORD_NAME)
    if record.get("status") != "completed":
        raise ValueError(f"{run_dir} holds a run with status {record.get('status')!r}; only completed runs export")
    checkpoint = run_dir / "checkpoint"
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint} is missing: the run was made with save_checkpoint=false")
    cfg = OmegaConf.create(record["config"])
    from gem.train import method_options  # the same option filtering as the run itself

    kind = cfg.task.kind
    num_labels = 1 if kind == "regression" else max(2, len(cfg.task.get("label_names") or []))
    loaded = load_model(cfg.model, kind, num_labels)
    targets = list(cfg.method.get("target_modules") or cfg.model.target_modules)
    method = build_method(cfg.method.name, targets, **method_options(cfg.method))
    model = method.prepare(loaded.model, loaded.head_parameter_names)
    method.load(model, checkpoint)
    return model, loaded.tokenizer, method, record


def export_run(run_dir: str | Path, output_dir: str | Path) -> Path:
    model, tokenizer, method, _ = load_trained(run_dir)
    merged = method.merged_model(model)
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run's folder (holds results.json and checkpoint/)")
    parser.add_argument("--output", required=True, help="folder for the merged Hugging Face model")
    args = parser.parse_args(argv)
    print(f"exported to {export_run(args.run_dir, args.output)}")


if __name__ == "__main__":
    main()
