"""The answer verifier: hand-written equivalence cases, answer extraction, garbage never raises."""

import random

import pytest

from metastone_jax.data.verify import MAX_ANSWER_CHARS, extract_answer, extract_boxed, is_equivalent, reward

EQUIVALENT = [
    ("32", "32"),
    (" 32 ", "32"),
    ("32.0", "32"),
    ("-7", "-7"),
    ("0.75", "3/4"),
    ("3/4", "6/8"),
    ("\\frac{3}{4}", "0.75"),
    ("\\dfrac{3}{4}", "3/4"),
    ("\\frac{\\frac{1}{2}}{3}", "1/6"),
    ("2*3+1", "7"),
    ("(1+2)*3", "9"),
    ("2^10", "1024"),
    ("-2^2", "-4"),
    ("2^-1", "0.5"),
    ("1,234", "1234"),
    ("1,234,567", "1234567"),
    ("$1,234$", "1234"),
    ("\\$5", "5"),
    ("x = 5", "5"),
    ("\\boxed{7}", "7"),
    ("5.", "5"),
    (".5", "1/2"),
    ("3\\cdot 4", "12"),
    ("3 \\times 4", "12"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("sqrt(2)^2", "2"),
    ("2\\pi", "pi*2"),
    ("90^\\circ", "90"),
    ("\\left(1+1\\right)", "2"),
    ("3(4)", "12"),
]
NOT_EQUIVALENT = [
    ("31", "32"),
    ("0.33", "1/3"),
    ("3/4", "4/3"),
    ("-7", "7"),
    ("\\pi", "3.14159"),
    ("1 1/2", "3/2"),
    ("1,2", "12"),
    ("2*3+1", "8"),
    ("1e5", "100000"),
    ("12", "1 2"),
]
GARBAGE = [
    None,
    "",
    "   ",
    "abc",
    "((1)",
    "1/0",
    "0^-1",
    "9^9^9",
    "2**100000",
    "(10^60)^64",
    "__import__('os')",
    "lambda: 1",
    "1" * (MAX_ANSWER_CHARS + 1),
    "\\frac{1}{",
    "\\boxed{",
    "sqrt(-)",
    "2^(1/1000)",
    "[1, 2]",
    "1..2",
    "--",
    "()",
    "\\sqrt{2^4095+1}",
    "x",
    "{}",
    "\x00\xff",
]


@pytest.mark.parametrize("prediction, reference", EQUIVALENT)
def test_equivalent_answers_are_accepted_in_both_directions(prediction, reference):
    assert is_equivalent(prediction, reference)
    assert is_equivalent(reference, prediction)


@pytest.mark.parametrize("prediction, reference", NOT_EQUIVALENT)
def test_different_values_are_rejected(prediction, reference):
    assert not is_equivalent(prediction, reference)


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_or_unbounded_input_returns_false_without_raising(garbage):
    assert is_equivalent(garbage, "1") is False
    assert is_equivalent("1", garbage) is False


def test_random_printable_strings_never_raise():
    rng = random.Random(0)
    alphabet = "0123456789+-*/^()[]{}.,$\\ abcdefrqstxpi="
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert is_equivalent(text, "3") in (True, False)
        assert extract_answer(text) is None or isinstance(extract_answer(text), str)


@pytest.mark.parametrize(
    "response, answer",
    [
        ("<think>7 + 5 = 12.\n\n12 * 3 = 36.\n\n</think> 36", "36"),
        ("<think>3 + 4 = 7.\n\n</think> The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("<think>a</think> 2*3+1", "2*3+1"),
        ("<think>we get 3</think> so it is 41.", "41"),
        ("<think>1</think> x</think> 9", "9"),
        ("no markers, first 3 and last 1,234", "1,234"),
        ("Thus \\boxed{\\sqrt{2}} is it, not 5", "\\sqrt{2}"),
        ("<think>7 + 5 = 12.\n\n", "12"),
        ("no number at all", None),
    ],
)
def test_extract_answer_prefers_after_think_then_boxed_then_last_number(response, answer):
    assert extract_answer(response) == answer


def test_extract_boxed_matches_nested_braces_and_takes_the_last_box():
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_boxed("nothing") is None


def test_reward_is_one_exactly_for_equivalent_final_answers():
    assert reward("<think>6 / 8 = 0.75.\n\n</think> 3/4", "0.75") == 1.0
    assert reward("<think>1 + 1 = 2.\n\n</think> 3", "2") == 0.0
    assert reward("", "2") == 0.0
