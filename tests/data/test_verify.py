"""The answer checker: hand-written verdicts, answer extraction, and bounded time on garbage in any thread.

Timeouts on the garbage tests are hang guards (pytest-timeout), generous for a loaded machine, not benchmarks.
"""

import sys
import threading

import pytest

from metastone_jax import tts
from metastone_jax.data import verify
from metastone_jax.data.verify import (
    MAX_ANSWER_CHARS,
    equivalences,
    extract_answer,
    extract_answers,
    extract_boxed,
    is_equivalent,
    reward,
    rewards,
)
from metastone_jax.data.verify_worker import WorkerPool, _math_verify_handlers

# (prediction, reference, the verdict a mathematician gives), written by hand.
VERDICTS = [
    # numbers
    ("42", "42", True),
    ("42.0", "42", True),
    ("0042", "42", True),
    ("-7", "7", False),
    ("1,234", "1234", True),
    ("3.14", "3.1416", False),
    ("100000000000000000001", "100000000000000000000", False),
    # fractions
    ("\\frac{3}{4}", "0.75", True),
    ("3/4", "\\dfrac{3}{4}", True),
    ("\\frac{6}{8}", "\\frac{3}{4}", True),
    ("\\tfrac12", "0.5", True),
    ("1.5", "\\frac32", True),
    ("1/3", "0.333", False),
    ("\\frac{1}{3}", "0.3333", False),
    ("\\frac{1}{3}", "\\frac{1}{4}", False),
    # LaTeX
    ("\\boxed{(1,2)}", "(1, 2)", True),
    ("e^{2}", "e^2", True),
    ("\\infty", "\\infty", True),
    ("-\\infty", "\\infty", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("2^{10}", "1024", True),
    ("\\pi", "3.14159", False),
    ("\\sqrt{2}", "1.41", False),
    # sets
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    # intervals
    ("[0,1)", "[0, 1)", True),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("x \\in (0, 1)", "(0,1)", True),
    ("[0,1)", "(0,1]", False),
    # tuples and matrices
    ("(3, -4)", "\\left(3,-4\\right)", True),
    ("(1, 2)", "(2, 1)", False),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False),
    # percentages
    ("10\\%", "0.1", True),
    ("50\\%", "\\frac{1}{2}", True),
    ("25\\%", "0.2", False),
    # units
    ("5\\text{ cm}", "5", True),
    ("90^\\circ", "90", True),
    ("\\$3.50", "3.5", True),
    ("12 \\text{ dollars}", "13", False),
    # multiple-choice letters
    ("\\text{(B)}", "B", True),
    ("(C)", "C", True),
    ("A", "B", False),
    ("\\text{(B)}", "A", False),
    # expressions and equations
    ("x^2+2x+1", "(x+1)^2", True),
    ("2x+1", "1+2x", True),
    ("\\sin^2 x + \\cos^2 x", "1", True),
    ("y = 2x+1", "2x+1", True),
    ("x = 5", "5", True),
    ("x^2", "x^3", False),
    ("\\frac{1}{0}", "1", False),
]


def test_the_verdict_table_has_the_promised_breadth():
    assert len(VERDICTS) >= 40
    assert sum(expected for _, _, expected in VERDICTS) >= 15 and sum(not e for _, _, e in VERDICTS) >= 15


@pytest.mark.timeout(300)
def test_every_pair_of_the_table_gets_its_hand_written_verdict():
    verdicts = equivalences([p for p, _, _ in VERDICTS], [r for _, r, _ in VERDICTS])
    wrong = [(p, r, want) for (p, r, want), got in zip(VERDICTS, verdicts) if got != want]
    assert wrong == []


@pytest.mark.timeout(120)
def test_one_pair_at_a_time_agrees_with_the_batch():
    for prediction, reference, expected in VERDICTS[:: len(VERDICTS) // 8]:
        assert is_equivalent(prediction, reference) is expected


@pytest.fixture
def handlers(monkeypatch):
    """The worker's math-verify functions, in this process; the library is restored afterwards."""
    import math_verify.parser

    monkeypatch.setattr(math_verify.parser, "parse_expr_cached", math_verify.parser.parse_expr_cached)
    return _math_verify_handlers()


@pytest.mark.timeout(120)
def test_integers_compared_here_get_math_verifys_own_verdict(handlers):
    """The in-process shortcut for integers must say what math-verify says about the same pair."""
    pairs = [("42", "42"), ("-0", "0"), ("007", "7"), ("1234567", "1234568"), ("-12", "12"), ("10" * 20, "10" * 20)]
    for prediction, reference in pairs:
        assert verify._compare_locally(prediction, reference) is handlers["equal"](prediction, reference)


@pytest.mark.parametrize(
    "response, answer",
    [
        ("<think>7 + 5 = 12.\n\n12 * 3 = 36.\n\n</think> 36", "36"),
        ("<think>3 + 4 = 7.\n\n</think> The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("<think>it is \\boxed{3}</think> so \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("<think>a</think> 2*3+1", "2*3+1"),
        ("<think>we get 3</think> so it is 41.", "41"),
        ("<think>1</think> x</think> 9", "9"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("The final answer is $\\frac{3}{4}$. I hope it is correct, unlike 5.", "\\frac{3}{4}"),
        ("Answer: 3 × 4 ÷ 2", "3 × 4 ÷ 2"),
        ("Thus \\boxed{\\sqrt{2}} is it, not 5", "\\sqrt{2}"),
        ("<think>7 + 5 = 12.\n\n", "12"),
        ("no number at all", None),
        ("<think>thinking</think>", None),
        ("", None),
    ],
)
@pytest.mark.timeout(120)
def test_extract_answer_prefers_after_think_then_boxed_then_gsm8k_then_math_verify(response, answer):
    assert extract_answer(response) == answer


@pytest.mark.timeout(120)
def test_batch_extraction_equals_one_at_a_time():
    responses = ["<think>x</think> 7", "so \\boxed{x^2}", "The answer is 12.", "#### 5", "nothing"]
    assert extract_answers(responses) == [extract_answer(response) for response in responses]


@pytest.mark.timeout(120)
def test_rewards_of_a_batch_are_one_exactly_for_equivalent_final_answers():
    responses = [
        "<think>6 / 8 = 0.75.\n\n</think> 3/4",
        "<think>1 + 1 = 2.\n\n</think> 3",
        "",
        "</think> \\boxed{10\\%}",
    ]
    assert rewards(responses, ["0.75", "2", "2", "0.1"]).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert reward("<think>1 + 1 = 2.\n\n</think> 2", "2") == 1.0


def test_extract_boxed_matches_nested_braces_and_takes_the_last_box():
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_boxed("nothing") is None


GARBAGE = {
    "100 kB of digits": "7" * 100_000,
    "deeply nested braces": "{" * 5000 + "1" + "}" * 5000,
    "unclosed braces": "\\boxed{" * 50,
    "frac without arguments": "\\frac",
    "frac with one argument": "\\frac{1}",
    "empty frac": "\\frac{}{}",
    "huge exponent tower": "2^{2^{2^{100}}}",
    "huge power": "9^{9^{9}}",
    "huge exponent": "7^{12456789}",
    "python": "__import__('os').system('false')",
    "control characters": "\x00\xff\ud800",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.timeout(60)
def test_garbage_is_wrong_without_raising_or_hanging(garbage):
    # "3" is no digit of any garbage: a number math-verify finds inside it cannot match by accident.
    assert is_equivalent(garbage, "3") is False
    assert is_equivalent("3", garbage) is False
    assert reward(f"<think>{garbage}</think> {garbage}", "3") == 0.0
    answer = extract_answer(garbage)
    assert answer is None or isinstance(answer, str)


def test_oversized_answers_never_reach_the_parser():
    assert not verify._bounded("1" * (MAX_ANSWER_CHARS + 1))
    assert not verify._bounded("(" * (verify.MAX_NESTING + 1))
    for power in ("9^{9^{9}}", "2^{ 2^{2^{100}}}", "10^10^10", "3^{1234567}"):
        assert not verify._bounded(power)
    assert verify._bounded("2^{2^{n}}") and verify._bounded("(2^3)^2") and verify._bounded("10^{100}")
    assert verify._bounded("\\left(\\frac{\\sqrt{3}}{2}, \\frac{1}{2}\\right)")


@pytest.mark.timeout(120)
def test_rewards_work_outside_the_main_thread():
    """math-verify's own timeouts use signal.alarm, which fails outside the main thread; ours do not."""
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(value=rewards(["</think> \\frac{1}{2}", "</think> 9^{9^{9}}"], ["0.5", "1"]))
    )
    thread.start()
    thread.join()
    assert result["value"].tolist() == [1.0, 0.0]


@pytest.mark.timeout(120)
def test_a_request_past_its_deadline_is_answered_by_its_fallback_and_the_pool_recovers():
    pool = WorkerPool(size=1)
    try:
        # The worker stuck on the power is killed; a fresh one answers the next request.
        assert pool.run([("equal", "9^{9^{9}}", "1"), ("extract", "so 5")], deadline_s=1.0) == [False, "5"]
        assert pool.run([("equal", "\\frac{1}{2}", "0.5")], deadline_s=30.0) == [True]
    finally:
        pool.close()


@pytest.mark.timeout(120)
def test_two_workers_answer_a_batch_in_order():
    pool = WorkerPool(size=2)
    try:
        requests = [("equal", f"\\frac{{{n}}}{{2}}", str(n / 2)) for n in range(6)] + [("equal", "1", "2")]
        assert pool.run(requests, deadline_s=30.0) == [True] * 6 + [False]
    finally:
        pool.close()


@pytest.mark.timeout(120)
def test_a_pool_started_ahead_answers_like_one_started_on_demand():
    """start() spawns the workers without waiting for them; the first run waits until they are ready and uses them."""
    pool = WorkerPool(size=2)
    try:
        pool.start()
        processes = [worker._process for worker in pool._workers]
        assert all(process is not None and process.poll() is None for process in processes)
        requests = [("equal", "\\frac{3}{2}", "1.5"), ("extract", "so 5"), ("equal", "1", "2")]
        assert pool.run(requests, deadline_s=30.0) == [True, "5", False]
        assert [worker._process for worker in pool._workers] == processes  # the spawned ones answered
    finally:
        pool.close()


def test_a_worker_that_cannot_start_is_reported_by_name(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="math-verify answer checker did not start"):
        WorkerPool(size=1).run([("extract", "so 5")], deadline_s=5.0)


def test_plain_expressions_are_parsed_without_eval(handlers, monkeypatch):
    """math-verify would hand "2*3+1" to sympy's parse_expr (Python eval); the worker routes it to the LaTeX parser."""
    import math_verify.parser

    def refuse(*args, **kwargs):
        raise AssertionError("parse_expr (eval) was called")

    monkeypatch.setattr(math_verify.parser, "parse_expr", refuse)
    assert handlers["extract"]("Answer: 2*3+1") == "2*3+1"
    assert handlers["equal"]("2*3+1", "7") is True
    assert handlers["equal"]("2**3", "8") is True


@pytest.mark.timeout(120)
def test_majority_vote_classes_use_the_same_equivalence():
    classes = tts.answer_classes(["\\frac{1}{2}", "0.5", "\\{1,2\\}", "1/2", "\\{2,1\\}", None, "3"])
    assert classes[0] == classes[1] == classes[3]
    assert classes[2] == classes[4] != classes[0]
    assert len({classes[5], classes[6], classes[0], classes[2]}) == 4
