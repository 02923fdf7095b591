"""Metrics for generative evaluation: SQuAD EM/F1, GSM8K exact match, stop-string truncation.

* SQuAD follows the official evaluation script (``evaluate-v2.0.py``, identical to v1.1 on
  answerable questions): lower-case, remove ASCII punctuation, remove the articles
  ``a``/``an``/``the``, collapse whitespace; token-level F1 over the bag of tokens; maximum
  over the gold answers.  An empty gold list means "unanswerable" (gold = ``""``), and F1
  between two empty token lists is 1 (v2.0 convention; v1.1 never has empty answers).
* GSM8K: the final answer is the number after the last ``####`` (the reference format) if
  present, otherwise the last number in the text; commas, ``$`` and a trailing ``.`` are
  dropped and the value is canonicalised (``"3.0"`` and ``"3.00"`` -> ``"3"``,
  ``"-0"`` -> ``"0"``), so equal values compare equal.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

__all__ = [
    "normalize_squad_answer",
    "squad_f1",
    "squad_exact_match",
    "gsm8k_final_number",
    "gsm8k_exact_match",
    "truncate_at_stop",
]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_squad_answer(text: str) -> str:
    """Official SQuAD normalisation (order as in the script: lower, punctuation, articles, spaces)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _gold(answers: Iterable[str] | str) -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    answers = list(answers)
    return answers if answers else [""]


def _f1(prediction: str, gold: str) -> float:
    pred_toks = normalize_squad_answer(prediction).split()
    gold_toks = normalize_squad_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    num_same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, answers: list[str]) -> float:
    """Token-level F1 of ``prediction`` against the best-matching gold answer, in [0, 1]."""
    return max(_f1(prediction, a) for a in _gold(answers))


def squad_exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    norm = normalize_squad_answer(prediction)
    return float(any(norm == normalize_squad_answer(a) for a in _gold(answers)))


# A number: optional sign and $, digits with proper thousands groups or plain digits,
# optional decimals; or a bare decimal such as ".5".  "1,2,3" is three numbers, not 123.
_NUMBER = re.compile(r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\$?\.\d+")


def _canonical(num: str) -> str | None:
    s = num.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gsm8k_final_number(text: str, require_marker: bool = False) -> str | None:
    """The final numeric answer of a GSM8K solution or generation, canonicalised; or None.

    The first number on the line of the last ``####``; without one (or with no number on
    that line) the last number of the text, unless ``require_marker`` (then None).

    >>> gsm8k_final_number("so 1,000 + 234 = 1,234\\n#### 1,234")
    '1234'
    >>> gsm8k_final_number("She pays $18.00 in total.")
    '18'
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1].split("\n", 1)[0]  # the answer line
        match = _NUMBER.search(tail)
        if match:
            return _canonical(match.group())
    if require_marker:
        return None
    matches = _NUMBER.findall(text)
    for cand in reversed(matches):
        canon = _canonical(cand)
        if canon is not None:
            return canon
    return None


def gsm8k_exact_match(generation: str, reference_answer: str, answer: str = "marker") -> float:
    """1.0 if the final numbers of ``generation`` and the GSM8K reference agree, else 0.0.

    ``answer="marker"`` (GEM_SPEC: "the final number after ``####``") reads the generation's
    answer only after ``####``: a generation cut off before it scores 0. ``"last_number"``
    also accepts the last number of a generation without ``####`` (a more lenient reading
    common in other evaluations). ``reference_answer`` may be the full reference solution
    (ending in ``#### N``) or just the number.
    """
    if answer not in ("marker", "last_number"):
        raise ValueError(f"gsm8k answer={answer!r}; choose 'marker' (the number after ####, the spec) "
                         f"or 'last_number'")
    ref = gsm8k_final_number(reference_answer)
    pred = gsm8k_final_number(generation, require_marker=answer == "marker")
    return float(ref is not None and pred == ref)


def truncate_at_stop(text: str, stop_strings: Iterable[str] | str | None) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (the stop string is removed).

    Empty stop strings are ignored; with no match the text is returned unchanged.
    """
    if not stop_strings:
        return text
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    cut = len(text)
    for stop in stop_strings:
        if stop:
            idx = text.find(stop)
            if idx != -1 and idx < cut:
                cut = idx
    return text[:cut]
