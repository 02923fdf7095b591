"""How much GEM's mask depends on the gradient pass's loss on a decoder (issue 19, item 1).

Two passes over the same first training examples of a run (run.py's data module and model, via
`experiments/stability.py`'s `Setup`): `task` (the training loss, candidate scoring) and `lm`
(the authors' pass, the LM loss over prompt + gold answer, `method.gradient_pass_loss=lm`). Both
select with GEM's rule (ratio scores, entropy budgets, density 0.001); the JSON gives the
Jaccard of the two masks overall and per matrix, and the budget shift (sum |k_l - k_l'| / 2K).

    python experiments/gradient_pass_loss.py --model smollm2-135m --task sst2 --data-dir ../shared/data \\
        --out results/stability/gradient_pass_loss_smollm2_sst2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments")]


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = torch.unique(torch.cat([a, b])).numel()
    return 1.0 if union == 0 else (a.numel() + b.numel() - union) / union


def main(argv: list[str] | None = None) -> dict:
    import gem
    from gem.lit.causal_module import prompt_and_answer_loss
    from stability import Setup

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = Setup(args.model, args.task, args.seed, args.data_dir, args.batch_size)
    masks, budgets = {}, {}
    for name, loss_fn in (("task", setup.loss_fn), ("lm", prompt_and_answer_loss)):
        config = copy.deepcopy(setup.configs["gem"])
        config.num_grad_samples = args.examples
        batches = setup.datamodule.gradient_pass_dataloader(args.examples)
        gem.select_entries(setup.model, config, batches, loss_fn)
        masks[name] = {n: i.cpu() for n, i in config.indices.items()}
        budgets[name] = dict(config.budgets)
    names = sorted(set(budgets["task"]))
    empty = torch.zeros(0, dtype=torch.long)
    per_matrix = {n: jaccard(masks["task"].get(n, empty), masks["lm"].get(n, empty)) for n in names}
    pairs = {name: torch.cat([i + k * 2**32 for k, n in enumerate(names) for i in [m.get(n, empty)]])
             for name, m in masks.items()}
    K = sum(budgets["task"].values())
    result = {
        "model": args.model, "task": args.task, "seed": args.seed, "examples": args.examples,
        "jaccard": jaccard(pairs["task"], pairs["lm"]),
        "budget_shift": sum(abs(budgets["task"][n] - budgets["lm"][n]) for n in names) / (2 * K),
        "per_matrix_jaccard": per_matrix, "budgets": budgets,
        "command": "python experiments/gradient_pass_loss.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.model} {args.task}: Jaccard(task, lm) = {result['jaccard']:.3f}, budget shift "
          f"{result['budget_shift']:.3f}")
    return result


if __name__ == "__main__":
    main()
