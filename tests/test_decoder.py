"""The causal-LM path: prompt templates, candidate scoring math, left padding, generation
scoring, and every method end to end on the tiny LLaMA (RTE and GSM8k, a few examples)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import run_in_process
from gem.data.causal_collate import CausalCollator, left_pad
from gem.data.prompts import TEMPLATES, render
from gem.data.tasks import TaskData
from gem.lit.causal_module import (
    candidate_scores,
    extract_code,
    generation_score,
    greedy_generate,
    lm_loss,
    prompt_and_answer_loss,
    suffix_logprobs,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

METHODS = ["full", "bitfit", "lora", "adapter", "gem"]


def _ex(**kw):
    base = {"uid": "t/0", "text_a": None, "text_b": None, "label": None, "choices": None, "target": None, "raw": {}}
    return {**base, **kw}


# --------------------------------------------------------------------------- templates


def test_prompt_templates_render():
    p = render("sst2", _ex(text_a="a gorgeous film .", label=1))
    assert p.text + p.candidates[p.label] == "a gorgeous film . It was great"
    assert p.candidates == (" terrible", " great")

    p = render("rte", _ex(text_a="Cats sleep.", text_b="Cats rest", label=0))
    assert p.text == 'Cats sleep.\nDoes this mean that "Cats rest" is true? Yes or No?\n'
    assert p.candidates == (" Yes", " No") and p.label == 0

    p = render("cb", _ex(text_a="It rained.", text_b="It was wet", label=2))
    assert p.text == 'Suppose It rained. Can we infer that "It was wet"? Yes, No, or Maybe?\n'
    assert p.candidates[p.label] == " Maybe"

    p = render("boolq", _ex(text_a="Paris is in France.", text_b="is paris in france", label=1))
    assert p.text == "Paris is in France. is paris in france?" and p.candidates == (" No", " Yes")

    p = render("wic", _ex(text_a="A bank loan.", text_b="The river bank.", word="bank", label=0))
    assert p.text.startswith('Does the word "bank" have the same meaning') and p.text.endswith(
        "\nA bank loan.\nThe river bank.\n")
    assert p.candidates[p.label] == " No"

    p = render("multirc", _ex(text_a="Tom ran.", label=1, raw={"question": "Who ran?", "answer": "Tom"}))
    assert p.text == 'Tom ran.\nQuestion: Who ran?\nI found this answer "Tom". Is that correct? Yes or No?\n'

    p = render("copa", _ex(text_a="The man turned on the faucet.", question="effect", label=1,
                           choices=["The toilet filled with water.", "Water flowed from the spout."]))
    assert p.text == "The man turned on the faucet so"
    assert p.candidates == (" the toilet filled with water.", " water flowed from the spout.")
    assert render("copa", _ex(text_a="I fell.", question="cause", label=0, choices=["I slipped.", "x"])).text \
        == "I fell because"

    p = render("gsm8k", _ex(text_a="What is 2+2?", target="2+2=4\n#### 4"))
    assert p.text == "Question: What is 2+2?\nAnswer:" and p.target == " 2+2=4\n#### 4"

    p = render("mbpp", _ex(text_a="Write a function to add.", target="def add(a, b):\n  return a + b\n",
                           raw={"test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}))
    assert "Write a function to add." in p.text and "assert add(1, 2) == 3\nassert add(0, 0) == 0\n" in p.text
    assert p.text.endswith("```python\n") and p.target == "def add(a, b):\n  return a + b\n```"

    p = render("squad", _ex(text_a="Ctx.", text_b="Q?", target="A", raw={"title": "T"}))
    assert p.text == "Title: T\nContext: Ctx.\nQuestion: Q?\nAnswer:" and p.target == " A"
    assert set(TEMPLATES) == {"sst2", "rte", "cb", "boolq", "wic", "multirc", "copa", "squad", "gsm8k", "mbpp"}


# --------------------------------------------------------------------------- scoring math


class BigramLM(torch.nn.Module):
    """logits at position t depend on token t only: a table, so log-likelihoods are easy by hand."""

    def __init__(self, vocab: int = 5):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None, use_cache=False, position_ids=None, logits_to_keep=0):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_candidate_loss_is_cross_entropy_of_mean_token_loglik():
    model = BigramLM()
    logp = torch.log_softmax(model.table.detach(), -1)  # logp[a, b] = log p(next=b | a)
    # prompt [1, 2]; candidate A = [3, 4] (two tokens), candidate B = [0] (one token, left-padded by 2 pads)
    pad = 0
    batch = {"input_ids": torch.tensor([[[1, 2, 3, 4], [pad, 1, 2, 0]]]),
             "attention_mask": torch.tensor([[[1, 1, 1, 1], [0, 1, 1, 1]]]),
             "score_mask": torch.tensor([[[0, 0, 1, 1], [0, 0, 0, 1]]]),
             "labels": torch.tensor([1])}
    mean_a = (logp[2, 3] + logp[3, 4]) / 2
    mean_b = logp[2, 0]
    scores = candidate_scores(model, batch)
    assert torch.allclose(scores, torch.stack([mean_a, mean_b]).view(1, 2), atol=1e-6)
    expected = -(mean_b - torch.logsumexp(torch.stack([mean_a, mean_b]), 0))
    loss = torch.nn.functional.cross_entropy(scores, batch["labels"])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # LM loss: mean NLL over all scored tokens of the rows
    flat = {k: v[0] for k, v in batch.items() if k != "labels"}
    assert lm_loss(model, flat).item() == pytest.approx(-(logp[2, 3] + logp[3, 4] + logp[2, 0]).item() / 3, abs=1e-6)


def _task(name, kind, label_names=()):
    return TaskData(name=name, kind=kind, label_names=list(label_names), metrics=["acc"], train=[], dev=[],
                    test=[], source="test")


def test_collator_masks_prompt_and_truncates_from_the_left(offline_tiny):
    tok = offline_tiny.tokenizer
    collate = CausalCollator(tok, _task("rte", "classification", ["entailment", "not_entailment"]), max_length=32)
    long = _ex(text_a="word " * 40, text_b="short", label=1)
    short = _ex(text_a="Cats sleep.", text_b="Cats rest", label=0)
    batch = collate([short, long])
    ids, mask, score = batch["input_ids"], batch["attention_mask"], batch["score_mask"]
    assert ids.shape[:2] == (2, 2) and ids.shape[2] == 32 and batch["labels"].tolist() == [0, 1]
    for b in range(2):
        for c, cand in enumerate([" Yes", " No"]):
            assert tok.decode(ids[b, c][score[b, c].bool()]) == cand   # only the candidate is scored
            assert score[b, c, -1] == 1                                # ... and it ends the row (left padding)
            real = mask[b, c].bool()
            assert not real[: int((~real).sum())].any()                # pads only on the left
    assert collate.num_truncated == 2 and collate.num_sequences == 4   # the long prompt, once per candidate
    assert tok.decode(ids[1, 0][mask[1, 0].bool()]).endswith('is true? Yes or No?\n Yes')
    gen = CausalCollator(tok, _task("gsm8k", "generation"), max_length=64, max_new_tokens=16)
    out = gen([_ex(text_a="What is 2+2?", target="4\n#### 4")])
    assert tok.decode(out["input_ids"][0][out["score_mask"][0].bool()]) == " 4\n#### 4" + tok.eos_token
    assert tok.decode(out["prompt_ids"][0]) == "Question: What is 2+2?\nAnswer:"
    assert left_pad([[1], [2, 3]], 0).tolist() == [[0, 1], [2, 3]]


@pytest.fixture(scope="module")
def offline_tiny():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        from gem.models import tiny

        yield tiny.tiny_llama_causal_lm()


def test_left_padding_batched_equals_unbatched(offline_tiny):
    model, tok = offline_tiny.model.double().eval(), offline_tiny.tokenizer
    prompts = ["Question: What is two plus two?\nAnswer:", "Hi there, my friend", "The quick brown fox jumps over the lazy"]
    rows = [tok(p)["input_ids"] for p in prompts]
    ids, mask = left_pad(rows, tok.pad_token_id), left_pad([[1] * len(r) for r in rows], 0)
    batched = greedy_generate(model, tok, ids, mask, max_new_tokens=6)
    single = [greedy_generate(model, tok, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), 6)[0]
              for r in rows]
    assert batched == single and all(len(t) > 0 for t in single)
    # scoring: the same rows' log-likelihoods are unchanged by padding (position ids count real tokens)
    score = left_pad([[0] * (len(r) - 2) + [1, 1] for r in rows], 0)
    total, count = suffix_logprobs(model, ids, mask, score)
    for i, r in enumerate(rows):
        one, _ = suffix_logprobs(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long),
                                 torch.tensor([[0] * (len(r) - 2) + [1, 1]]))
        assert total[i].item() == pytest.approx(one.item(), abs=1e-9)
    assert count.tolist() == [2, 2, 2]
    model.float()


# --------------------------------------------------------------------------- generation scoring


def test_generation_scores():
    gsm = _ex(target="2+2=4\n#### 4")
    assert generation_score("em", "gsm8k", " 2 plus 2 is 4\n#### 4", gsm) == 1.0
    assert generation_score("em", "gsm8k", " #### 5", gsm) == 0.0
    squad = _ex(target="Denver Broncos", raw={"answers": {"text": ["Denver Broncos", "Broncos"]}})
    assert generation_score("f1", "squad", " the Broncos", squad) == 1.0
    assert extract_code("def f():\n  return 1\n```\nmore") == "def f():\n  return 1\n"
    assert extract_code("```python\ndef f():\n  return 1\n```") == "def f():\n  return 1\n"
    mbpp = _ex(raw={"test_list": ["assert add(1, 2) == 3"], "test_imports": []})
    assert generation_score("pass@1", "mbpp", "def add(a, b):\n    return a + b\n", mbpp) == 1.0
    assert generation_score("pass@1", "mbpp", "def add(a, b):\n    return a - b\n", mbpp) == 0.0


# --------------------------------------------------------------------------- end to end

RUN = ["model=tiny-llama", "logger=none", "trainer.max_epochs=1", "trainer.accelerator=cpu",
       "task.num_train=8", "task.num_dev=4", "task.num_test=4", "save_checkpoint=false", "batch_size=4"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_rte_and_gsm8k(method, data_dir, tmp_path, monkeypatch):
    seen = {}
    if method == "gem":  # the gradient pass must use the training loss of the causal module
        import gem.tuner.select as sel

        original = sel.accumulate_gradients

        def spy(model, batches, weights, **kw):
            seen["loss_fn"] = kw.get("loss_fn")
            return original(model, batches, weights, **kw)

        monkeypatch.setattr(sel, "accumulate_gradients", spy)
    extra = ["method.num_grad_samples=8"] if method == "gem" else []
    rte = run_in_process([*RUN, f"method={method}", "task=rte", f"data_dir={data_dir}", *extra], tmp_path / "rte")
    assert rte["status"] == "completed" and 0.0 <= rte["metrics"]["test/acc"] <= 1.0
    assert "dev/acc" in rte["metrics"] and rte["best_epoch"] == 0
    assert 0 < rte["params"]["tuned"] <= rte["params"]["total"] and rte["params"]["head"] == 0
    if method == "gem":
        assert getattr(seen["loss_fn"], "__func__", None).__qualname__ == "CausalLMModule.batch_loss"
        assert rte["gem"]["gradient_samples"] == 8 and rte["gem"]["changed_outside_mask"] == 0
    gsm = run_in_process([*RUN, f"method={method}", "task=gsm8k", "task.num_train=4", f"data_dir={data_dir}",
                          "task.generation.max_new_tokens=4", *extra], tmp_path / "gsm8k")
    assert gsm["status"] == "completed" and gsm["main_metric"] == "test/em"
    assert 0.0 <= gsm["metrics"]["test/em"] <= 1.0 and "dev/em" in gsm["metrics"]


def test_authors_lm_gradient_pass(offline_tiny, data_dir, tmp_path, monkeypatch):
    """method.gradient_pass_loss=lm: the plain LM loss over prompt + gold answer (labels = input ids)."""
    model = offline_tiny.model.eval()
    gold = [5, 9, 14, 3, 7]
    other = [5, 9, 14, 3, 8]
    rows = torch.tensor([[[0, *other], [0, *gold]], [[*gold, 2], [*other, 2]]])  # left-padded example 0
    mask = torch.tensor([[[0, 1, 1, 1, 1, 1]] * 2, [[1] * 6] * 2])
    batch = {"input_ids": rows, "attention_mask": mask, "labels": torch.tensor([1, 0])}
    with torch.no_grad():
        got = prompt_and_answer_loss(model, batch)
        hf = [model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss for r in (gold, [*gold, 2])]
    counts = torch.tensor([len(gold) - 1, len(gold)], dtype=torch.float)
    assert got.item() == pytest.approx(float((torch.stack(hf) * counts).sum() / counts.sum()), rel=1e-5)

    import gem.tuner.select as sel

    seen = {}
    original = sel.accumulate_gradients
    monkeypatch.setattr(sel, "accumulate_gradients",
                        lambda *a, **kw: seen.setdefault("loss_fn", kw.get("loss_fn")) and original(*a, **kw))
    rec = run_in_process([*RUN, "method=gem_lm", "task=rte", f"data_dir={data_dir}", "method.num_grad_samples=8"],
                         tmp_path / "rte")
    assert rec["status"] == "completed" and rec["method"] == "gem_lm"
    assert seen["loss_fn"] is prompt_and_answer_loss and rec["gem"]["changed_outside_mask"] == 0
    from gem.methods import MethodError

    with pytest.raises(MethodError, match=r"gradient_pass_loss=lm .* needs a decoder model"):
        run_in_process(["model=tiny-bert", *RUN[1:], "method=gem_lm", "task=rte", f"data_dir={data_dir}"],
                       tmp_path / "bert")


def test_mbpp_runs_with_pass_at_1(data_dir, tmp_path):
    rec = run_in_process([*RUN, "method=lora", "task=mbpp", "task.num_train=4", f"data_dir={data_dir}",
                          "task.num_test=2", "task.num_dev=2", "task.generation.max_new_tokens=4"], tmp_path)
    assert rec["status"] == "completed" and rec["main_metric"] == "test/pass@1"
    assert not math.isnan(rec["metrics"]["test/pass@1"])
    rows = [json.loads(line) for line in (tmp_path / "generations_test.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"uid", "generation", "pass@1"} <= set(rows[0])


def test_single_token_shortcut_matches_full_scoring(offline_tiny):
    model, tok = offline_tiny.model.eval(), offline_tiny.tokenizer
    collate = CausalCollator(tok, _task("rte", "classification", ["entailment", "not_entailment"]), max_length=64)
    batch = collate([_ex(text_a="Cats sleep a lot.", text_b="Cats rest", label=0),
                     _ex(text_a="A much longer premise about dogs and their owners.", text_b="Dogs", label=1)])
    b, c, t = batch["input_ids"].shape
    with torch.no_grad():
        fast = candidate_scores(model, batch)
        total, count = suffix_logprobs(model, batch["input_ids"].view(b * c, t),
                                       batch["attention_mask"].view(b * c, t), batch["score_mask"].view(b * c, t))
    assert count.tolist() == [1.0] * 4
    assert torch.allclose(fast, (total / count).view(b, c), atol=1e-5)


# --------------------------------------------------------------------------- evaluation order


def test_length_ordered_eval_batches_longest_first_and_covers_every_example(offline_tiny):
    from gem.lit.datamodule import TaskDataModule

    task = _task("rte", "classification", ["entailment", "not_entailment"])
    task.dev = [_ex(uid=f"d/{i}", text_a="word " * n, text_b="short", label=i % 2) for i, n in enumerate([3, 80, 1, 80, 9])]
    collate = CausalCollator(offline_tiny.tokenizer, task, max_length=64)
    module = TaskDataModule(task, collate, batch_size=2, eval_batch_size=2, seed=0, eval_order="length")
    lengths = [collate.length(ex) for ex in task.dev]
    assert lengths[1] == lengths[3] == 64 and lengths[2] < lengths[0] < lengths[4] < 64  # capped at max_length
    widths, uids = [], []
    for batch in module.val_dataloader():
        widths.append(batch["input_ids"].shape[-1])
    for batch in TaskDataModule(task, lambda b: [ex["uid"] for ex in b], batch_size=2, eval_batch_size=2,
                                seed=0)._loader(module._eval_split("dev"), 2, shuffle=False):
        uids += batch
    assert uids == ["d/1", "d/3", "d/4", "d/0", "d/2"]  # longest first, ties in sampled order
    assert widths == sorted(widths, reverse=True) and widths[0] == 64
    dataset_order = TaskDataModule(task, collate, batch_size=2, eval_batch_size=2, seed=0)
    assert [b["input_ids"].shape[-1] for b in dataset_order.val_dataloader()] == [64, 64, lengths[4]]
    assert widths == [64, lengths[4], lengths[2]]  # 201 padded positions per candidate instead of 283
    with pytest.raises(ValueError, match="eval_order='shortest' is not one of dataset, length"):
        TaskDataModule(task, collate, batch_size=2, eval_batch_size=2, seed=0, eval_order="shortest")
    with pytest.raises(ValueError, match="needs a collate function with a length"):
        TaskDataModule(task, lambda b: b, batch_size=2, eval_batch_size=2, seed=0, eval_order="length")


def test_eval_order_does_not_change_metrics_or_generations(data_dir, tmp_path):
    # Every test example is generated for exactly once, with the same text, whatever the order.
    common = [*RUN, "method=lora", "task=gsm8k", "task.num_train=4", f"data_dir={data_dir}", "task.num_dev=4",
              "task.num_test=7", "eval_batch_size=3", "task.generation.max_new_tokens=4"]
    runs = {order: run_in_process([*common, f"eval_order={order}"], tmp_path / order) for order in ("dataset", "length")}
    assert runs["length"]["config"]["eval_order"] == "length" and runs["dataset"]["config"]["eval_order"] == "dataset"
    for key in ("dev/em", "test/em"):
        assert runs["length"]["metrics"][key] == runs["dataset"]["metrics"][key]
    rows = {order: [json.loads(line) for line in (tmp_path / order / "generations_test.jsonl").read_text().splitlines()]
            for order in runs}
    assert len(rows["length"]) == 7 and len({r["uid"] for r in rows["length"]}) == 7
    assert [r["uid"] for r in rows["length"]] != [r["uid"] for r in rows["dataset"]]  # the order did change
    assert sorted(map(json.dumps, rows["length"])) == sorted(map(json.dumps, rows["dataset"]))


def test_zero_shot_scores_the_untouched_model(data_dir, tmp_path):
    # Nothing trains: the test score cannot depend on the seed (which only redraws train/dev),
    # and no step is taken.
    common = [*RUN, "method=zero_shot", "task=rte", f"data_dir={data_dir}", "save_checkpoint=true"]
    runs = [run_in_process([*common, f"seed={seed}"], tmp_path / f"s{seed}") for seed in (1, 2)]
    for record in runs:
        assert record["status"] == "completed" and record["method"] == "zero_shot"
        assert record["params"]["trainable"] == 0 == record["params"]["tuned"] and record["train_steps"] == 0
        assert len(record["history"]) == 1 and "dev/acc" in record["metrics"]
    assert runs[0]["metrics"]["test/acc"] == runs[1]["metrics"]["test/acc"]
    assert (tmp_path / "s1" / "checkpoint" / "method_config.json").exists()


def test_zero_shot_refuses_a_model_with_a_new_head(data_dir, tmp_path):
    from gem.methods import MethodError

    with pytest.raises(MethodError, match=r"zero_shot .* new, untrained task head .* model=smollm2-135m"):
        run_in_process(["model=tiny-bert", "logger=none", "trainer.accelerator=cpu", "method=zero_shot", "task=rte",
                        "task.num_train=8", "task.num_dev=4", "task.num_test=4", f"data_dir={data_dir}"],
                       tmp_path / "run")
