"""Efficiency benchmark: step time, peak memory, optimizer state and checkpoint size per method.

Same model, same batches (synthetic, or a task's real ones with `--task`), for `full`, `bitfit`,
`lora`, `adapter` and `gem`:

* **step time** (forward + backward + optimizer.step + zero_grad): every method's model
  lives in this one process and the timed steps are interleaved round-robin (the order
  rotates each round), so background load on a shared machine hits all methods alike.
  Warm-up steps first, then the median of `--steps` steps.
* **peak memory**: one fresh subprocess per method (`--single METHOD`), so peaks never
  mix. The child builds the model, prepares the method (GEM: selects its mask from the
  gradient sums the parent computed), builds AdamW, then measures the *increase* of
  memory over the state just before the first step during `--mem-steps` steps:
  on CPU the RSS high-water mark (reset through /proc/self/clear_refs after
  malloc_trim, so setup peaks do not count), on CUDA torch.cuda.max_memory_allocated
  after reset_peak_memory_stats. The increase holds activations, gradients, optimizer
  state and temporaries; the frozen weights (identical for every method) are reported
  apart (`rss_before_bytes` / `mem_before_bytes`).
* **optimizer state**: numel of every tensor in optimizer.state after one step
  (`optimizer_state_numel`, AdamW step counters included), and of the moments of the
  method's own parameters only (`optimizer_state_method_numel`, the task head excluded).
* **checkpoint**: bytes of every file `method.save(model, dir)` writes.
* **GEM**: the gradient pass (`--grad-batches` batches) and the selection math are
  timed separately.
* **backward_floor** (a reference row, `--methods ...,backward_floor`): the frozen model
  with one trainable scalar on the embedding output (and the task head), so the step is
  forward + the input-gradient backward through every layer, with no weight gradient at
  all. A method that tunes anything in the first layer (GEM, LoRA, BitFit, adapters)
  cannot step faster than this; `method / backward_floor` is that method's own overhead,
  and `backward_floor / full` is the lowest step-time ratio to full FT this model, batch
  and device allow.

    python experiments/benchmark.py                         # MiniLM, CPU, all methods
    python experiments/benchmark.py --model smollm2-135m --batch-size 4   # the decoder (paper's family)
    python experiments/benchmark.py --methods lora,gem --steps 20 --json results/bench.json
    python experiments/benchmark.py --device cuda --precision bf16 --model roberta-base
    python experiments/benchmark.py --model opt-1.3b --init random   # architecture only: no weights needed

`--task sst2 --data-dir ../shared/data` times real training batches instead of synthetic
full-length ones: the first training batches of `run.py ... seed=<--seed> batch_size=<--batch-size>`,
from run.py's own data module (padded to each batch's longest example, cut at the task's
max_length), and GEM's gradient pass on that run's first training examples; every method steps
through the same batches in the same order (encoder models, classification tasks). SST-2's batches of 16 are padded to about
35 tokens, not 128: which of the two a table reports changes the ratios (results/README.md).

`--init random` builds the model from its config (config.json and tokenizer, no weights) with
random weights, seeded. Step time, memory, optimizer state and checkpoint size depend on the
architecture and K, not on the weights' values (GEM then selects other entries, the same number),
so this measures models whose weights are not at hand; it says nothing about accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

ALL_METHODS = ["full", "bitfit", "lora", "adapter", "gem", "backward_floor"]
REFERENCE_ROWS = ("backward_floor",)
DEFAULT_MODEL = {"name": "minilm", "pretrained": "packaged:minilm", "kind": "encoder",
                 "target_modules": ["query", "value"]}
RESULT_PREFIX = "BENCH_RESULT "
# `--preset dispatch`: the CPU stand-in for a GPU's launch overhead. A random-init LLaMA-style
# model so small (16 layers, hidden 64, a 256-token vocabulary, 2 x 16 tokens, one thread) that
# the arithmetic is negligible and a step's time is what each module costs the host: Python,
# autograd nodes, dispatcher calls. GEM runs at density 0.01 with min_per_matrix=64, so each of
# the 32 q/v matrices has entries (checked and reported): on random weights the entropy budgets
# alone leave a few matrices at 0 even at density 0.05.
DISPATCH = {
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 16, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 64,
              "tie_word_embeddings": True},
    "args": {"batch_size": 2, "seq_len": 16, "threads": 1, "methods": "gem,full,lora,backward_floor",
             "no_memory": True, "steps": 200, "warmup": 20, "init": "pretrained", "grad_batches": 4,
             "gem_option": ["density=0.01", "min_per_matrix=64"]},
}
NUM_LABELS = 2


# --- configuration -----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm",
                   help="a conf/model name (minilm, tiny-bert, ...), a YAML path, or a JSON object")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated method names")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--task", default=None,
                   help="time real training batches of this task (conf/task/<name>.yaml) instead of synthetic ones")
    p.add_argument("--data-dir", default=None, help="data folder for --task (as run.py's data_dir)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method before timing")
    p.add_argument("--mem-steps", type=int, default=3, help="steps run by each memory subprocess")
    p.add_argument("--grad-batches", type=int, default=4, help="batches in GEM's gradient pass")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--init", default="pretrained", choices=["pretrained", "random"],
                   help="random: the model's architecture with random weights (see above)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing", default="interleaved", choices=["interleaved", "sequential"],
                   help="interleaved: all models in memory, steps round-robin (fairest under noise); "
                        "sequential: one model at a time (for models too large to hold five copies)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    p.add_argument("--preset", default=None, choices=["dispatch"],
                   help="dispatch: a step dominated by per-module host cost (see DISPATCH below)")
    p.add_argument("--gem-option", action="append", default=None, metavar="KEY=VALUE",
                   help="a GEM option (method.<key> in run.py), e.g. density=0.01; repeatable")
    # Internal: the memory subprocess.
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--masks-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preset == "dispatch" and not args.single:  # the preset's values, where the command line gave none
        for key, value in DISPATCH["args"].items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.precision == "bf16" and args.device == "cpu":
        print("note: bf16 autocast on CPU is supported but rarely faster", file=sys.stderr)
    return args


def model_config(spec: str) -> dict:
    if spec.lstrip().startswith("{"):
        return json.loads(spec)
    path = Path(spec)
    if not path.exists():
        path = REPO / "conf" / "model" / f"{spec}.yaml"
    if path.exists():
        from omegaconf import OmegaConf

        return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    if spec == "minilm":
        return dict(DEFAULT_MODEL)
    raise SystemExit(f"--model {spec!r}: no such model config (conf/model/*.yaml, a YAML path or JSON)")


# --- data ----------------------------------------------------------------------------------------

def make_batch(tokenizer, kind: str, batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ordinary-token ids from the tokenizer's vocabulary, full length, random labels."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    ids = allowed[torch.randint(0, allowed.numel(), (batch_size, seq_len), generator=g)]
    if kind != "decoder":
        if tokenizer.cls_token_id is not None:
            ids[:, 0] = tokenizer.cls_token_id
        if tokenizer.sep_token_id is not None:
            ids[:, -1] = tokenizer.sep_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "decoder":
        batch["labels"] = ids.clone()
    else:
        if "token_type_ids" in getattr(tokenizer, "model_input_names", []):
            batch["token_type_ids"] = torch.zeros_like(ids)
        batch["labels"] = torch.randint(0, NUM_LABELS, (batch_size,), generator=g)
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# --- one method: build, step, measure ---------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args, device: torch.device):
    if args.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def random_init_folder(cfg: dict, folder: Path, seed: int) -> dict:
    """Save the config's architecture with random weights (and its tokenizer) into `folder`;
    return the model config pointing there. The backbone is saved without a task head, so
    loading it for classification gives a new head, as a pre-trained checkpoint does."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from gem.models.loading import _remote_kwargs, load_tokenizer
    from gem.models.packaged import model_kind, resolve_model_source

    source, kwargs = resolve_model_source(cfg)
    config = AutoConfig.from_pretrained(source, **_remote_kwargs(kwargs))  # as load_model reads it
    decoder = model_kind(cfg) == "decoder"
    torch.manual_seed(seed)
    # from_config builds the model: of the loading options only trust_remote_code applies
    code = {"trust_remote_code": True} if kwargs.get("trust_remote_code") else {}
    model = (AutoModelForCausalLM if decoder else AutoModel).from_config(config, **code)
    model.save_pretrained(folder)
    load_tokenizer(cfg).save_pretrained(folder)
    return {**cfg, "pretrained": str(folder), "kind": "decoder" if decoder else "encoder",
            "name": f"{cfg.get('name') or source} (random init)"}


def gem_options(args) -> dict:
    """`--gem-option key=value` pairs, values read as YAML scalars (0.01, 64, true, ratio)."""
    import yaml

    options = {}
    for item in args.gem_option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--gem-option {item!r}: use KEY=VALUE, e.g. density=0.01")
        options[key.strip()] = yaml.safe_load(value)
    return options


def dispatch_folder(folder: Path, seed: int) -> dict:
    """The `--preset dispatch` model: DISPATCH's LLaMA config, random weights, a 256-word tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = DISPATCH["llama"]["vocab_size"]
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", pad_token="w1",
                            eos_token="w2").save_pretrained(folder)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**DISPATCH["llama"], pad_token_id=1, eos_token_id=2)).save_pretrained(folder)
    return {"name": "dispatch-llama-16x64 (random init)", "pretrained": str(folder), "kind": "decoder",
            "target_modules": ["q_proj", "v_proj"]}


_LOADED_TASKS: dict[tuple, Any] = {}


def task_datamodule(args, tokenizer, kind: str):
    """run.py's data module for `args.task` (sampled with `--seed`, encoder collation): the
    benchmark's real batches come from its loaders, not from a copy of their logic."""
    from gem.data import encoder_collator, load_task
    from gem.lit.datamodule import TaskDataModule

    if kind != "encoder":
        raise SystemExit("--task times encoder models; for a decoder use synthetic batches (--seq-len)")
    task_cfg = task_config(args)
    key = (args.task, args.data_dir, args.seed)
    if key not in _LOADED_TASKS:  # every method's build asks; read and sample the data once
        _LOADED_TASKS[key] = load_task(task_cfg, args.data_dir, args.seed)
    collate = encoder_collator(tokenizer, _LOADED_TASKS[key], int(task_cfg.max_length))
    return TaskDataModule(_LOADED_TASKS[key], collate, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                          seed=args.seed)


def task_batches(args, tokenizer, kind: str, count: int) -> list[dict]:
    """The first `count` training batches of a run with `--seed`, epoch after epoch."""
    loader = task_datamodule(args, tokenizer, kind).train_dataloader()
    batches: list[dict] = []
    for epoch in range(count):  # one batch per epoch at least: `count` epochs always suffice
        loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
        batches += itertools.islice(loader, count - len(batches))
        if len(batches) == count:
            return batches
    return batches


def task_config(args):
    """conf/task/<args.task>.yaml, checked to be a classification task."""
    from omegaconf import OmegaConf

    path = REPO / "conf" / "task" / f"{args.task}.yaml"
    if not path.is_file():
        names = sorted(f.stem for f in path.parent.glob("*.yaml"))
        raise SystemExit(f"--task {args.task!r}: no conf/task/{args.task}.yaml; tasks: {', '.join(names)}")
    cfg = OmegaConf.load(path)
    if cfg.get("kind") != "classification":
        raise SystemExit(f"--task {args.task!r} is a {cfg.get('kind')} task; --task supports classification tasks")
    return cfg


def num_labels(args) -> int:
    return len(task_config(args).label_names) if args.task else NUM_LABELS


def load(args, cfg: dict, device: torch.device):
    from gem.models.loading import load_model

    loaded = load_model(cfg, "classification", num_labels(args))
    loaded.model.to(device)
    return loaded


def timed_batches(args, tokenizer, kind: str) -> list[dict]:
    """The batches the timed steps cycle through: one synthetic batch, or the task's real ones."""
    if args.task:
        return task_batches(args, tokenizer, kind, args.warmup + max(args.steps, args.mem_steps))
    return [make_batch(tokenizer, kind, args.batch_size, args.seq_len, args.seed)]


def gradient_batches(args, tokenizer, kind: str) -> list[dict]:
    if args.task:  # as run.py's gradient pass: the sampled training set's first examples, in order
        loader = task_datamodule(args, tokenizer, kind).gradient_pass_dataloader(args.grad_batches * args.batch_size)
        return list(loader)
    return [make_batch(tokenizer, kind, args.batch_size, args.seq_len, args.seed + 1 + i)
            for i in range(args.grad_batches)]


def gem_select(args, model, method, tokenizer, kind, device):
    """GEM's selection as run.py makes it (the library's `select_entries`): the wrapped model."""
    batches = [to_device(b, device) for b in gradient_batches(args, tokenizer, kind)]

    def loss_fn(m, b):
        with autocast(args, device):
            return m(**b).loss

    sync(device)
    wrapped = method.select(model, batches, loss_fn, seed=args.seed, device=device)
    sync(device)
    return wrapped


def backward_floor_method():
    """The `backward_floor` reference row: nothing of the model trains but a scalar gate."""
    from gem.methods.base import Method

    class BackwardFloor(Method):
        name = "backward_floor"

        def prepare(self, model, head_parameter_names=()):
            embeddings = model.get_input_embeddings()
            embeddings.benchmark_gate = torch.nn.Parameter(torch.ones((), device=embeddings.weight.device))
            embeddings.register_forward_hook(lambda module, args, out: out * module.benchmark_gate)
            return super().prepare(model, head_parameter_names)

        def is_method_parameter(self, name: str) -> bool:
            return name.endswith("benchmark_gate")

    return BackwardFloor()


def build(args, cfg: dict, name: str, device: torch.device, masks_file: str | None = None) -> dict:
    """A fresh model prepared for `name`, its AdamW, and (GEM) the selection timings."""
    from gem.methods import build_method
    from gem.tuner import gem_modules

    torch.manual_seed(args.seed)
    loaded = load(args, cfg, device)
    options = gem_options(args) if name == "gem" else {}
    method = backward_floor_method() if name == "backward_floor" else \
        build_method(name, cfg.get("target_modules"), **options)
    model = method.prepare(loaded.model, loaded.head_parameter_names)
    info: dict[str, Any] = {}
    if getattr(method, "selects_entries", False):  # GEM and the sparse ablations
        if masks_file:  # a memory subprocess: the entries the timed process selected, no second pass
            model = method.restore(model, torch.load(masks_file, map_location=device, weights_only=True))
        else:
            model = gem_select(args, model, method, loaded.tokenizer, loaded.kind, device)
            selection = method.selection
            info.update(gradient_pass_s=selection.gradient_pass_s, selection_math_s=selection.selection_math_s,
                        gradient_samples=selection.gradient_samples)
            info["_masks"] = {name.removeprefix("base_model.model."): layer.gem_indices["default"]
                              for name, layer in gem_modules(model)}
        info["total_budget"] = method.total_budget
        info["gem_matrices_with_entries"] = sum(1 for _ in gem_modules(model))
    model.train()
    optimizer = method.optimizer_class(method.optimizer_param_groups(model, 0.0), lr=args.lr)
    batches = [to_device(b, device) for b in timed_batches(args, loaded.tokenizer, loaded.kind)]
    return {"name": name, "model": model, "method": method, "optimizer": optimizer, "batches": batches, "next": 0,
            "info": info, "num_parameters": loaded.num_parameters}


def train_step(args, state: dict, device: torch.device) -> float:
    model, optimizer = state["model"], state["optimizer"]
    batch = state["batches"][state["next"] % len(state["batches"])]  # every method: the same sequence
    state["next"] += 1
    sync(device)
    start = time.perf_counter()
    with autocast(args, device):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def optimizer_state_numel(state: dict) -> tuple[int, int]:
    """(all tensors in optimizer.state, moments of the method's own parameters only)."""
    method, model, optimizer = state["method"], state["model"], state["optimizer"]
    head_ids = {id(p) for n, p in model.named_parameters() if method._is_head(n)}
    total = method_only = 0
    for param, st in optimizer.state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                total += value.numel()
                if key != "step" and id(param) not in head_ids:
                    method_only += value.numel()
    return total, method_only


def checkpoint_bytes(state: dict) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        state["method"].save(state["model"], tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def static_measures(state: dict) -> dict:
    method, model = state["method"], state["model"]
    total, method_only = optimizer_state_numel(state)
    out = {
        "tuned_entries": int(method.tuned_count(model)),
        "head_entries": int(method.head_count(model)),
        "trainable_entries": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "optimizer_state_numel": int(total),
        "optimizer_state_method_numel": int(method_only),
        "checkpoint_bytes": int(checkpoint_bytes(state)),
        "num_model_parameters": int(state["num_parameters"]),
    }
    for key in ("gradient_pass_s", "selection_math_s", "gradient_samples", "total_budget", "gem_matrices_with_entries"):
        if key in state["info"]:
            out[key] = state["info"][key]
    return out


# --- memory (in the --single subprocess) ----------------------------------------------------------

def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to VmRSS
        return True
    except OSError:
        return False


def measure_memory(args, cfg: dict, name: str, device: torch.device) -> dict:
    state = build(args, cfg, name, device, masks_file=args.masks_file)
    state["info"].pop("_masks", None)
    gc.collect()
    out: dict[str, Any] = {"method": name}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(args.mem_steps):
            train_step(args, state, device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_mem_bytes=peak - before, mem_before_bytes=before, peak_mem_total_bytes=peak,
                   memory_source="torch.cuda.max_memory_allocated")
    else:
        _malloc_trim()
        exact = _reset_rss_peak()
        before = _proc_status_bytes("VmRSS") or 0
        for _ in range(args.mem_steps):
            train_step(args, state, device)
        if exact:
            peak = _proc_status_bytes("VmHWM") or 0
            source = "VmHWM after clear_refs"
        else:  # no /proc reset: the lifetime high-water mark (setup peaks may count)
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            source = "ru_maxrss (lifetime)"
        out.update(peak_mem_bytes=max(0, peak - before), rss_before_bytes=before, peak_mem_total_bytes=peak,
                   memory_source=source)
    return out


def run_memory_subprocess(args, name: str, masks_file: str | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", name, "--model", args.model,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--mem-steps", str(args.mem_steps), "--grad-batches", str(args.grad_batches),
           "--lr", str(args.lr), "--device", args.device, "--precision", args.precision,
           "--threads", str(args.threads), "--seed", str(args.seed)]
    for option in args.gem_option or []:
        cmd += ["--gem-option", option]
    if args.task:
        cmd += ["--task", args.task] + (["--data-dir", str(args.data_dir)] if args.data_dir else [])
    # with --init random, args.model already names the random-init folder the parent saved
    if masks_file:
        cmd += ["--masks-file", masks_file]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"memory subprocess for {name} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


# --- the whole benchmark -------------------------------------------------------------------------------

def time_methods(args, cfg: dict, device: torch.device, work_dir: str) -> dict[str, dict]:
    results: dict[str, dict] = {}
    states: dict[str, dict] = {}

    def setup(name: str) -> dict:
        state = build(args, cfg, name, device)
        masks = state["info"].pop("_masks", None)
        if masks is not None:
            path = os.path.join(work_dir, f"{name}_masks.pt")
            torch.save({k: v.cpu() for k, v in masks.items()}, path)
            state["masks_file"] = path
        return state

    def finish(name: str, state: dict, times: list[float]) -> None:
        results[name] = {"step_time_s": statistics.median(times), "step_times_s": times,
                         **static_measures(state)}
        batches = state["batches"]
        results[name]["_timed_lengths"] = [int(batches[i % len(batches)]["input_ids"].shape[-1])
                                           for i in range(args.warmup, args.warmup + len(times))]
        if "masks_file" in state:
            results[name]["_masks_file"] = state["masks_file"]

    if args.timing == "interleaved":
        for name in args.methods:
            states[name] = setup(name)
        for name in args.methods:
            for _ in range(args.warmup):
                train_step(args, states[name], device)
        times: dict[str, list[float]] = {n: [] for n in args.methods}
        for r in range(args.steps):
            order = args.methods[r % len(args.methods):] + args.methods[:r % len(args.methods)]
            for name in order:
                times[name].append(train_step(args, states[name], device))
        for name in args.methods:
            finish(name, states[name], times[name])
        states.clear()
    else:
        for name in args.methods:
            state = setup(name)
            for _ in range(args.warmup):
                train_step(args, state, device)
            finish(name, state, [train_step(args, state, device) for _ in range(args.steps)])
            del state
            gc.collect()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.3g}x"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def markdown_table(results: dict[str, dict], ref: str = "full") -> str:
    base = results.get(ref, {})
    lines = [
        "| method | tuned entries | step time (ms) | step vs full | peak mem (MiB) | mem vs full "
        "| optimizer state (elems) | opt vs full | checkpoint | ckpt vs full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['tuned_entries']:,} | {1000 * r['step_time_s']:.1f} | "
            f"{_ratio(r['step_time_s'], base.get('step_time_s'))} | {_mib(r.get('peak_mem_bytes'))} | "
            f"{_ratio(r.get('peak_mem_bytes'), base.get('peak_mem_bytes'))} | {r['optimizer_state_numel']:,} | "
            f"{_ratio(r['optimizer_state_numel'], base.get('optimizer_state_numel'))} | "
            f"{_size(r['checkpoint_bytes'])} | {_ratio(r['checkpoint_bytes'], base.get('checkpoint_bytes'))} |")
    return "\n".join(lines)


def summary_lines(results: dict[str, dict]) -> list[str]:
    lines = []
    gem, lora, full = results.get("gem"), results.get("lora"), results.get("full")
    floor = results.get("backward_floor")
    if floor and full:
        lines.append(f"backward_floor/full step time {_ratio(floor['step_time_s'], full['step_time_s'])}: the lowest "
                     "ratio any method training the first layer can reach here (forward + input-gradient backward)")
    if floor and gem:
        lines.append(f"GEM/backward_floor step time {_ratio(gem['step_time_s'], floor['step_time_s'])}: GEM's own "
                     "overhead (sparse gradients, mask bookkeeping, optimizer on K entries)")
    if gem and lora:
        lines.append(
            f"GEM vs LoRA: step time {_ratio(gem['step_time_s'], lora['step_time_s'])}, "
            f"peak memory {_ratio(gem.get('peak_mem_bytes'), lora.get('peak_mem_bytes'))}, "
            f"optimizer state {_ratio(gem['optimizer_state_numel'], lora['optimizer_state_numel'])}, "
            f"checkpoint {_ratio(gem['checkpoint_bytes'], lora['checkpoint_bytes'])}")
    if gem and "gradient_pass_s" in gem:
        lines.append(f"GEM selection: gradient pass {gem['gradient_pass_s']:.2f}s on {gem.get('gradient_samples')} "
                     f"examples, selection math {gem['selection_math_s']:.3f}s, budget K={gem.get('total_budget')}")
    checks = []
    if gem and full:
        checks.append(("GEM/full step time <= 0.6", gem["step_time_s"] / full["step_time_s"], 0.6))
        checks.append(("GEM/full optimizer state <= 0.01",
                       gem["optimizer_state_numel"] / full["optimizer_state_numel"], 0.01))
    if gem and floor:
        checks.append(("GEM/backward_floor step time <= 1.05", gem["step_time_s"] / floor["step_time_s"], 1.05))
    if gem and lora:
        checks.append(("GEM/LoRA step time <= 1.1", gem["step_time_s"] / lora["step_time_s"], 1.1))
        if gem.get("peak_mem_bytes") and lora.get("peak_mem_bytes"):
            checks.append(("GEM/LoRA peak memory <= 1.05", gem["peak_mem_bytes"] / lora["peak_mem_bytes"], 1.05))
    for label, value, limit in checks:
        lines.append(f"target {label}: {value:.3f} {'PASS' if value <= limit else 'FAIL'}")
    return lines


def dispatch_overhead(results: dict[str, dict]) -> dict:
    """(method step - floor step) / number of q/v modules, in microseconds, medians of the timed steps."""
    modules = 2 * DISPATCH["llama"]["num_hidden_layers"]
    floor = results["backward_floor"]["step_time_s"]
    per = {name: 1e6 * (results[name]["step_time_s"] - floor) / modules for name in ("gem", "lora") if name in results}
    out = {"target_modules": modules, "host_overhead_us_per_module": per,
           "gem_matrices_with_entries": results.get("gem", {}).get("gem_matrices_with_entries")}
    if per.get("lora"):
        out["gem_over_lora"] = per["gem"] / per["lora"]
    return out


def shape_text(args, lengths: list[int]) -> str:
    if not args.task:
        return str(args.seq_len)
    return (f"{args.task} training batches (padded to {min(lengths)}-{max(lengths)} tokens, "
            f"median {statistics.median(lengths):g})")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    from gem.core.sparse_linear import sddmm_supported
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    cfg = model_config(args.model) if args.preset != "dispatch" or args.single else None
    if args.task:
        task_config(args)  # a bad --task fails before any model is built

    if args.single:
        out = measure_memory(args, cfg, args.single, device)
        print(RESULT_PREFIX + json.dumps(out), flush=True)
        return out

    known = set(__import__("gem.methods", fromlist=["METHODS"]).METHODS) | set(REFERENCE_ROWS)
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}")
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        if cfg is None:  # --preset dispatch
            cfg = dispatch_folder(Path(work_dir) / "dispatch", args.seed)
            args.model = json.dumps(cfg)
        if args.init == "random":
            cfg = random_init_folder(cfg, Path(work_dir) / "random_init", args.seed)
            args.model = json.dumps(cfg)  # the memory subprocesses load the same weights
        results = time_methods(args, cfg, device, work_dir)
        if not args.no_memory:
            for name in args.methods:
                mem = run_memory_subprocess(args, name, results[name].get("_masks_file"))
                mem.pop("method", None)
                results[name].update(mem)
    lengths = []
    for r in results.values():
        r.pop("_masks_file", None)
        lengths = r.pop("_timed_lengths", lengths)  # the same for every method
    wall = time.perf_counter() - wall

    if args.preset == "dispatch":
        meta_dispatch = dispatch_overhead(results)
    meta = {"model": cfg.get("name", args.model), "device": str(device), "precision": args.precision,
            "init": args.init, "weight_grad_kernel": "sddmm" if sddmm_supported(device) else "gather",
            "threads": args.threads,
            "batch_size": args.batch_size, "seq_len": None if args.task else args.seq_len,
            "task": args.task, "timed_batch_lengths": lengths,
            "steps": args.steps, "warmup": args.warmup, "timing": args.timing, "torch": torch.__version__,
            "wall_s": round(wall, 1)}
    print(f"\n{meta['model']}, {device} {args.precision}, GEM gradient kernel {meta['weight_grad_kernel']}, "
          f"batch {args.batch_size} x {shape_text(args, lengths)}, "
          f"{args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up ({args.timing}); "
          f"peak memory = increase over the pre-step state ({'RSS high-water' if device.type == 'cpu' else 'CUDA allocated'})\n")
    print(markdown_table(results))
    print()
    for line in summary_lines(results):
        print(line)
    if args.preset == "dispatch":
        meta["dispatch"] = meta_dispatch
        per = meta_dispatch["host_overhead_us_per_module"]
        print(f"host overhead per q/v module over backward_floor ({meta_dispatch['target_modules']} modules): "
              + ", ".join(f"{m} {v:.1f} us" for m, v in per.items())
              + (f"; GEM/LoRA {meta_dispatch['gem_over_lora']:.2f} "
                 f"({'PASS' if meta_dispatch['gem_over_lora'] <= 0.4 else 'FAIL'} <= 0.4)" if "gem_over_lora" in
                 meta_dispatch else ""))
    print(f"total wall time {wall:.1f}s")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({**results, "_meta": meta}, indent=2))
    return results


if __name__ == "__main__":
    main()
