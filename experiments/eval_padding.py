"""How much of evaluation is padding: positions computed per real token, by `eval_order`.

For each task, the test split is batched (`eval_batch_size`) as training's dev/test loaders
batch it, once in the sampled order (`eval_order=dataset`) and once longest first
(`eval_order=length`); the script counts the positions each order computes (batch x padded
width, summed; for generation tasks the prompt batches greedy decoding runs over) against
the real tokens. Tokenizers only, no model: a count, not a timing, so it is exact and the
same on every machine. Lengths are cut at the configured max_length (a run would also clamp it
to the model's position limit, e.g. 512 for MiniLM; the encoder tasks' configs are within it).

    python experiments/eval_padding.py --model smollm2-135m --tasks rte,boolq,cb,gsm8k,mbpp
    python experiments/eval_padding.py --model minilm --tasks sst2,rte,boolq
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from gem.data import encoder_collator, load_task  # noqa: E402
from gem.data.causal_collate import causal_collator  # noqa: E402
from gem.lit.datamodule import EVAL_ORDERS, TaskDataModule  # noqa: E402
from gem.models.loading import load_tokenizer, model_kind  # noqa: E402


def positions(loader) -> tuple[int, int]:
    """(real tokens, computed positions) over a loader's batches."""
    real = computed = 0
    for batch in loader:
        mask = batch["prompt_attention_mask"] if "prompt_attention_mask" in batch else batch["attention_mask"]
        real += int(mask.sum())
        computed += mask.numel()
    return real, computed


def measure(model: str, task_name: str, data_dir: str | None, seed: int, eval_batch_size: int | None) -> dict:
    overrides = [f"model={model}", f"task={task_name}", f"seed={seed}"]
    overrides += [f"data_dir={data_dir}"] if data_dir else []
    overrides += [f"eval_batch_size={eval_batch_size}"] if eval_batch_size else []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    tokenizer = load_tokenizer(cfg.model)
    kind = model_kind(cfg.model)
    task = load_task(cfg.task, data_dir=cfg.get("data_dir"), seed=seed)
    if kind == "decoder":
        generation = cfg.task.get("generation") or {}
        collate = causal_collator(tokenizer, task, int(cfg.model.get("max_length") or cfg.task.max_length),
                                  int(generation.get("max_new_tokens", 0)))
    else:
        collate = encoder_collator(tokenizer, task, int(cfg.task.max_length))
    row = {"task": task_name, "examples": len(task.test), "eval_batch_size": int(cfg.eval_batch_size)}
    for order in EVAL_ORDERS:
        module = TaskDataModule(task, collate, batch_size=int(cfg.batch_size), eval_batch_size=int(cfg.eval_batch_size),
                                seed=seed, eval_order=order)
        row["real"], row[order] = positions(module.test_dataloader())
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model name (default: smollm2-135m)")
    parser.add_argument("--tasks", default="rte,boolq,cb,gsm8k,mbpp", help="comma-separated conf/task names")
    parser.add_argument("--data-dir", default=None, help="local data folder (default: data_dir / GEM_DATA_DIR)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--eval-batch-size", type=int, default=None, help="default: the model config's")
    args = parser.parse_args(argv)
    print(f"model {args.model}: positions computed per real token on each task's test split")
    print("| task | examples | eval batch | real tokens | dataset order | length order | length / dataset |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in [t for t in args.tasks.split(",") if t]:
        r = measure(args.model, name, args.data_dir, args.seed, args.eval_batch_size)
        print(f"| {name} | {r['examples']} | {r['eval_batch_size']} | {r['real']} | {r['dataset'] / r['real']:.2f}x "
              f"| {r['length'] / r['real']:.2f}x | {r['length'] / r['dataset']:.2f} |")


if __name__ == "__main__":
    main()
