"""The arithmetic generator: determinism, correct answers (checked by Python's own parser), well-formed steps."""

import ast
import operator
import re
from fractions import Fraction

import pytest

from metastone_jax.data.arithmetic import STEP_DELIMITER, ArithmeticTask, format_prompt

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")
_PYTHON_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_KNOB_SETTINGS = [
    ArithmeticTask(seed=3),
    ArithmeticTask(seed=5, num_steps=(1, 6), operand_range=(2, 12), max_value=200),
    ArithmeticTask(seed=7, num_steps=(3, 3), operators=("-",)),
    ArithmeticTask(seed=9, num_steps=(4, 5), operators=("*", "/"), max_value=50),
]


def _evaluate(node) -> Fraction:
    """Exact value of a parsed arithmetic expression, written independently of the generator."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise AssertionError(f"unexpected syntax {ast.dump(node)}")


def _split_solution(solution: str) -> tuple[str, str]:
    match = re.fullmatch(r"<think>(.*)</think> (\d+)", solution, flags=re.DOTALL)
    assert match, f"solution does not have the <think>...</think> answer form: {solution!r}"
    return match.group(1), match.group(2)


def test_same_seed_and_index_give_the_same_sample_from_separate_instances():
    first, second = ArithmeticTask(seed=11), ArithmeticTask(seed=11)
    assert [first.sample(i) for i in (0, 1, 57, 10**9)] == [second.sample(i) for i in (0, 1, 57, 10**9)]


def test_different_seeds_and_different_indices_give_different_problems():
    seed_a, seed_b = ArithmeticTask(seed=0), ArithmeticTask(seed=1)
    differing_seeds = sum(seed_a.sample(i)["question"] != seed_b.sample(i)["question"] for i in range(40))
    distinct_indices = len({seed_a.sample(i)["question"] for i in range(40)})
    assert differing_seeds >= 35
    assert distinct_indices >= 35


@pytest.mark.parametrize("task", _KNOB_SETTINGS, ids=lambda task: f"seed{task.seed}")
def test_answer_equals_python_evaluation_of_the_question(task):
    for index in range(150):
        sample = task.sample(index)
        value = _evaluate(ast.parse(sample["question"], mode="eval"))
        assert value.denominator == 1 and str(value.numerator) == sample["answer"], sample


@pytest.mark.parametrize("task", _KNOB_SETTINGS, ids=lambda task: f"seed{task.seed}")
def test_solution_steps_chain_correctly_and_stay_in_the_knob_ranges(task):
    for index in range(150):
        sample = task.sample(index)
        reasoning, answer = _split_solution(sample["solution"])
        assert answer == sample["answer"]
        assert reasoning.endswith(STEP_DELIMITER)
        steps = reasoning[: -len(STEP_DELIMITER)].split(STEP_DELIMITER)
        assert task.num_steps[0] <= len(steps) <= task.num_steps[1]
        previous = int(re.match(r"\(*(\d+)", sample["question"]).group(1))
        assert task.operand_range[0] <= previous <= task.operand_range[1]
        for step in steps:
            left, op, right, result = _STEP.fullmatch(step).groups()
            assert op in task.operators and int(left) == previous
            assert task.operand_range[0] <= int(right) <= task.operand_range[1]
            exact = _PYTHON_OPERATORS[op](Fraction(left), Fraction(right))
            assert exact == int(result) and 0 <= int(result) <= task.max_value, step
            previous = int(result)
        assert previous == int(answer)


def test_prompt_is_the_question_on_its_own_line():
    assert format_prompt("1 + 2") == "1 + 2\n"


@pytest.mark.parametrize(
    "knobs, named",
    [
        (dict(num_steps=(3, 2)), "num_steps"),
        (dict(operand_range=(0, 9)), "operand_range"),
        (dict(max_value=5), "max_value"),
        (dict(operators=("+", "^")), "operators"),
        (dict(seed=-1), "seed"),
        (dict(operators=("+",), num_steps=(20, 20), max_value=9), "max_value"),
    ],
)
def test_invalid_knobs_are_rejected_with_a_message_naming_them(knobs, named):
    with pytest.raises(ValueError, match=named):
        ArithmeticTask(**knobs)
