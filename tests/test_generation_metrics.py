import pytest

from gem.generation_metrics import (
    gsm8k_exact_match,
    gsm8k_final_number,
    normalize_squad_answer,
    squad_exact_match,
    squad_f1,
    truncate_at_stop,
)


# --------------------------------------------------------------------------- SQuAD
def test_squad_normalisation():
    assert normalize_squad_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_squad_answer("an apple, a day") == "apple day"
    assert normalize_squad_answer("Theory") == "theory"  # "the" only as a whole word


def test_squad_f1_hand_computed():
    # pred tokens {denver, broncos, won}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert squad_f1("Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    # articles and punctuation vanish: exact token match
    assert squad_f1("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    # pred {carolina, panthers}, gold {denver, broncos}: no overlap
    assert squad_f1("Carolina Panthers", ["Denver Broncos"]) == 0.0
    # multiset overlap: pred [a1 x a1] vs gold [a1 a1 y]: common 2, P = R = 2/3
    assert squad_f1("cat dog cat", ["cat cat bird"]) == pytest.approx(2 / 3)


def test_squad_max_over_gold_answers():
    # pred "levis stadium in santa clara" (5 tokens); gold "santa clara": P = 2/5, R = 1,
    # F1 = 2 * 0.4 / 1.4 = 4/7; gold "levis stadium": also 4/7; the full answer: exact -> 1
    golds = ["Santa Clara", "Levi's Stadium", "Levi's Stadium, Santa Clara"]
    assert squad_f1("Levi's Stadium in Santa Clara", golds[:2]) == pytest.approx(4 / 7)
    assert squad_f1("Levi's Stadium in Santa Clara", golds) == pytest.approx(2 * (4 / 5) / (4 / 5 + 1))
    assert squad_f1("Levis Stadium Santa Clara", golds) == 1.0
    assert squad_exact_match("levis stadium, santa clara", golds) == 1.0
    assert squad_exact_match("Santa Clara, California", golds) == 0.0


def test_squad_empty_cases():
    assert squad_f1("", ["Denver"]) == 0.0
    assert squad_f1("", []) == 1.0  # unanswerable and no answer given (v2.0 rule)
    assert squad_f1("the", ["a"]) == 1.0  # both normalise to nothing
    assert squad_exact_match("", []) == 1.0


# --------------------------------------------------------------------------- GSM8K
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 1,234", "1234"),
        ("#### 72", "72"),
        ("So the answer is 3.0", "3"),
        ("She pays $18.00.", "18"),
        ("It costs $1,250.50 in total.", "1250.5"),
        ("The difference is -5 degrees", "-5"),
        ("First 10, then 20, finally 30.", "30"),  # fallback: last number
        ("#### The answer is 18 dollars, not 20", "18"),  # number right after ####
        ("1,2,3", "3"),  # not a thousands-grouped number
        ("no digits here", None),
        ("#### none\nbut 7 was written before", "7"),
    ],
)
def test_gsm8k_final_number(text, expected):
    assert gsm8k_final_number(text) == expected


def test_gsm8k_exact_match():
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    # the spec's reading (default): only the number after #### counts
    assert gsm8k_exact_match("She makes $18 a day.", ref) == 0.0  # cut off before "####"
    assert gsm8k_exact_match("... #### 18.00", ref) == 1.0
    assert gsm8k_exact_match("18 + 1 = 19\n#### 18", ref) == 1.0
    assert gsm8k_exact_match("#### 19", ref) == 0.0
    assert gsm8k_exact_match("I don't know", ref) == 0.0
    # the lenient reading also takes the last number of a generation without "####"
    assert gsm8k_exact_match("She makes $18 a day.", ref, answer="last_number") == 1.0
    assert gsm8k_exact_match("The answer is 19", ref, answer="last_number") == 0.0
    assert gsm8k_exact_match("The total is 1,234", "1234", answer="last_number") == 1.0
    with pytest.raises(ValueError, match="choose 'marker'"):
        gsm8k_exact_match("#### 18", ref, answer="first_number")


def test_gsm8k_final_number_with_the_marker_required():
    assert gsm8k_final_number("So 2 + 3 = 5\n#### 5", require_marker=True) == "5"
    assert gsm8k_final_number("So 2 + 3 = 5", require_marker=True) is None
    assert gsm8k_final_number("#### none\nbut 7 was written before", require_marker=True) is None


# --------------------------------------------------------------------------- stop strings
def test_truncate_at_stop():
    assert truncate_at_stop("answer 42\n\nQuestion: next", ["\n\n", "Question:"]) == "answer 42"
    assert truncate_at_stop("abc", ["x"]) == "abc"
    assert truncate_at_stop("abc", []) == "abc"
    assert truncate_at_stop("abc", None) == "abc"
    assert truncate_at_stop("a<|end|>b", "<|end|>") == "a"
    assert truncate_at_stop("abc", [""]) == "abc"  # empty stop strings are ignored
    assert truncate_at_stop("xyzSTOPabcEND", ["END", "STOP"]) == "xyz"  # earliest wins
