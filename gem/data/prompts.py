"""Prompt templates for causal LMs (the paper's decoder protocol, MeZO-style).

One readable template per task turns an example (see `gem.data.loading`) into a `Prompt`:

* classification / multiple choice: `text` is the context; `candidates` are the texts that
  may follow it (one per label, in `label_names` order, or the example's choices); `label`
  is the gold candidate's index. The model scores each `text + candidate` by the mean
  log-likelihood of the candidate's tokens.
* generation: `text` is the prompt and `target` the reference continuation the LM loss
  trains on (greedy generation from `text` is scored against the example's references).

Candidates and targets start with the space (or newline) that separates them from the prompt,
so `text + candidate` is exactly the scored string.

    SST-2    "<sentence> It was"                                          -> " terrible" | " great"
    RTE      "<premise>\\nDoes this mean that \\"<hypothesis>\\" is true? Yes or No?\\n" -> " Yes" | " No"
    CB       "Suppose <premise> Can we infer that \\"<hypothesis>\\"? Yes, No, or Maybe?\\n"
                                                                  -> " Yes" | " No" | " Maybe"
    BoolQ    "<passage> <question>?"                                      -> " No" | " Yes"
    WiC      "Does the word \\"<word>\\" have the same meaning in these two sentences? Yes, No?\\n<s1>\\n<s2>\\n"
                                                                          -> " No" | " Yes"
    MultiRC  "<paragraph>\\nQuestion: <q>\\nI found this answer \\"<a>\\". Is that correct? Yes or No?\\n"
                                                                          -> " No" | " Yes"
    COPA     "<premise without final period> because" / " so"           -> " <choice, first letter lower-cased>"
    SQuAD    "Title: <title>\\nContext: <context>\\nQuestion: <question>\\nAnswer:" -> " <answer>"
    GSM8k    "Question: <question>\\nAnswer:"                             -> " <solution ... #### N>"
    MBPP     "You are an expert Python programmer, and here is your task: <problem> Your code
              should pass these tests:\\n\\n<asserts>\\n```python\\n"         -> "<code>\\n```"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gem.data.collate import copa_first_segment, lower_first
from gem.data.tasks import DataError


@dataclass(frozen=True)
class Prompt:
    text: str
    candidates: tuple[str, ...] | None = None
    label: int | None = None
    target: str | None = None


def sst2(ex: dict) -> Prompt:
    return Prompt(f"{ex['text_a']} It was", (" terrible", " great"), ex["label"])


def rte(ex: dict) -> Prompt:
    # label_names [entailment, not_entailment]
    text = f"{ex['text_a']}\nDoes this mean that \"{ex['text_b']}\" is true? Yes or No?\n"
    return Prompt(text, (" Yes", " No"), ex["label"])


def cb(ex: dict) -> Prompt:
    # label_names [entailment, contradiction, neutral]
    text = f"Suppose {ex['text_a']} Can we infer that \"{ex['text_b']}\"? Yes, No, or Maybe?\n"
    return Prompt(text, (" Yes", " No", " Maybe"), ex["label"])


def boolq(ex: dict) -> Prompt:
    # label_names ["false", "true"]; text_a = passage, text_b = question
    question = ex["text_b"].strip().rstrip("?")
    return Prompt(f"{ex['text_a']} {question}?", (" No", " Yes"), ex["label"])


def wic(ex: dict) -> Prompt:
    # label_names ["false", "true"]
    text = (f"Does the word \"{ex['word']}\" have the same meaning in these two sentences? Yes, No?\n"
            f"{ex['text_a']}\n{ex['text_b']}\n")
    return Prompt(text, (" No", " Yes"), ex["label"])


def multirc(ex: dict) -> Prompt:
    # label_names ["false", "true"]; raw keeps question and answer apart
    raw = ex["raw"]
    text = (f"{ex['text_a']}\nQuestion: {raw['question']}\n"
            f"I found this answer \"{raw['answer']}\". Is that correct? Yes or No?\n")
    return Prompt(text, (" No", " Yes"), ex["label"])


def copa(ex: dict) -> Prompt:
    # "The man turned on the faucet" + " so" -> " water flowed from the spout."
    text = copa_first_segment(ex["text_a"], ex.get("question"))
    return Prompt(text, tuple(" " + lower_first(c) for c in ex["choices"]), ex["label"])


def squad(ex: dict) -> Prompt:
    title = ex["raw"].get("title", "")
    text = f"Title: {title}\nContext: {ex['text_a']}\nQuestion: {ex['text_b']}\nAnswer:"
    return Prompt(text, target=None if ex["target"] is None else " " + ex["target"])


def gsm8k(ex: dict) -> Prompt:
    return Prompt(f"Question: {ex['text_a']}\nAnswer:", target=None if ex["target"] is None else " " + ex["target"])


def mbpp(ex: dict) -> Prompt:
    tests = "\n".join(ex["raw"]["test_list"])
    text = (f"You are an expert Python programmer, and here is your task: {ex['text_a']} "
            f"Your code should pass these tests:\n\n{tests}\n```python\n")
    target = None if ex["target"] is None else ex["target"].rstrip() + "\n```"
    return Prompt(text, target=target)


TEMPLATES: dict[str, Callable[[dict], Prompt]] = {
    "sst2": sst2, "rte": rte, "cb": cb, "boolq": boolq, "wic": wic, "multirc": multirc, "copa": copa,
    "squad": squad, "gsm8k": gsm8k, "mbpp": mbpp,
}


def render(task_name: str, example: dict) -> Prompt:
    """The prompt of one example of `task_name` (see the module docstring)."""
    template = TEMPLATES.get(task_name)
    if template is None:
        raise DataError(f"task {task_name} has no prompt template for decoder models "
                        f"(templates: {', '.join(sorted(TEMPLATES))}); use an encoder model or add one "
                        f"in gem/data/prompts.py")
    return template(example)
