"""The arithmetic generator: determinism, correct answers (checked by Python's own parser), well-formed steps, the
held-out eval split, and the step checker (on hand-written steps, and aligned with the SPRM's step positions)."""

import ast
import hashlib
import operator
import re
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from metastone_jax.data.arithmetic import (
    STEP_DELIMITER,
    ArithmeticTask,
    check_step,
    format_prompt,
    reasoning_steps,
    step_correctness,
)
from metastone_jax.data.pipeline import arithmetic_dataset
from metastone_jax.data.tokenizer import build_arithmetic_tokenizer
from metastone_jax.models.sprm import step_score_mask

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


def _held_out_by_hash(question: str) -> bool:
    """The eval split's definition, recomputed here: SHA-256 of the text, first 8 bytes big-endian, mod 16 == 0."""
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 16 == 0


def test_train_and_eval_splits_never_share_a_question_text():
    task = ArithmeticTask()
    train = {batch_question for batch in _first_batches(task, 100, 20) for batch_question in batch["question"]}
    held_out = {task.sample(10**12 + i, "eval")["question"] for i in range(300)}
    assert len(train) > 1500 and len(held_out) > 250
    assert not any(_held_out_by_hash(q) for q in train)
    assert all(_held_out_by_hash(q) for q in held_out)
    assert not train & held_out
    # The split depends on the text alone: another seed's training stream avoids this seed's eval questions too.
    other_seed = {ArithmeticTask(seed=1).sample(i)["question"] for i in range(2000)}
    assert not other_seed & held_out


def _first_batches(task, batch_size, count):
    iterator = iter(arithmetic_dataset(task, batch_size, shard_index=0, shard_count=1))
    return [next(iterator) for _ in range(count)]


def test_without_the_split_identical_questions_recur_at_far_apart_indices():
    # Why a split by text is needed: index i and index 10**12 + i often draw the same text in this small space.
    task = ArithmeticTask()
    train = {task.sample(i)["question"] for i in range(2000)}
    unsplit = [task.sample(10**12 + i, "train")["question"] for i in range(300)]  # the train split at far indices
    assert sum(q in train for q in unsplit) > 10


@pytest.mark.parametrize("task", _KNOB_SETTINGS, ids=lambda task: f"seed{task.seed}")
def test_eval_split_keeps_the_number_of_steps_and_correct_answers(task):
    for index in range(40):
        train, held_out = task.sample(index), task.sample(index, "eval")
        assert train["solution"].count(STEP_DELIMITER) == held_out["solution"].count(STEP_DELIMITER)
        value = _evaluate(ast.parse(held_out["question"], mode="eval"))
        assert str(value.numerator) == held_out["answer"] and _held_out_by_hash(held_out["question"])


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split 'test' is not one of"):
        ArithmeticTask().sample(0, "test")


@pytest.mark.parametrize(
    "step, right",
    [
        ("3 + 4 = 7", True),
        ("3 + 4 = 8", False),
        ("9 - 4 = 5", True),
        ("4 - 9 = 5", False),
        ("6 * 7 = 42", True),
        ("8 / 2 = 4", True),
        ("7 / 2 = 3", False),  # not exact
        ("5 / 0 = 0", False),
        ("0 / 5 = 0", True),
        ("12 * 10 = 120", True),
        ("3 + 4 =  7", False),  # malformed from here on
        (" 3 + 4 = 7", False),
        ("3 + 4", False),
        ("3 + = 7", False),
        ("", False),
        ("3 + 4 = 7 = 7", False),
        ("(3 + 4) = 7", False),
        ("4 - 9 = - 5", False),
        ("3 ^ 4 = 81", False),
    ],
)
def test_check_step_on_hand_written_steps(step, right):
    assert check_step(step) is right


@pytest.mark.parametrize(
    "response, steps",
    [
        ("<think>3 + 4 = 7.\n\n7 * 2 = 14.\n\n</think> 14", ["3 + 4 = 7", "7 * 2 = 14"]),
        # A delimiter right after <think> and the second of a run end no step.
        ("<think>.\n\n3 + 4 = 7.\n\n.\n\n7 * 2 = 15.\n\n</think> 15", ["3 + 4 = 7", "7 * 2 = 15"]),
        # Without <think> the whole response is the span, and a leading delimiter ends an empty step.
        (".\n\n3 + 4 = 7.\n\n", ["", "3 + 4 = 7"]),
        # Cut off inside a step: the unfinished piece is no step.
        ("<think>3 + 4 = 7.\n\n7 * 2", ["3 + 4 = 7"]),
        # Delimiters after </think> and before the last <think> are outside the span.
        ("<think>9 - 1 = 8.\n\n<think>2 + 2 = 4.\n\n</think> 4.\n\n", ["2 + 2 = 4"]),
        ("no steps at all", []),
        ("<think></think> 3", []),
    ],
)
def test_reasoning_steps_of_hand_written_responses(response, steps):
    assert reasoning_steps(response) == steps
    assert step_correctness(response) == [check_step(step) for step in steps]


def test_reference_solutions_have_only_right_steps():
    task = ArithmeticTask(seed=6)
    for index in range(50):
        for split in ("train", "eval"):
            solution = task.sample(index, split)["solution"]
            assert step_correctness(solution) == [True] * solution.count(STEP_DELIMITER)


def test_steps_line_up_with_the_positions_the_sprm_scores():
    """The text's steps are the SPRM's: as many as `step_score_mask` marks on the tokens of the same response."""
    tokenizer = build_arithmetic_tokenizer(ArithmeticTask())
    responses = [
        "<think>3 + 4 = 7.\n\n7 * 2 = 14.\n\n</think> 14",
        "<think>.\n\n3 + 4 = 7.\n\n.\n\n.\n\n7 * 2 = 15.\n\n</think> 15",
        ".\n\n3 + 4 = 7.\n\n",
        "<think>3 + 4 = 7.\n\n7 * 2",
        "<think>9 - 1 = 8.\n\n<think>2 + 2 = 4.\n\n</think> 4.\n\n",
        "3 + 4 = 7.\n\n</think>.\n\n",
        "<think>5 = 5 = 5.\n\n( 3.\n\n</think>",
    ]
    prompt = tokenizer.encode(format_prompt("3 + 4 * 2"))
    encoded = [tokenizer.encode(response) for response in responses]
    assert [tokenizer.decode(ids) for ids in encoded] == responses
    length = len(prompt) + max(map(len, encoded))
    tokens = np.full((len(responses), length), tokenizer.pad_id)
    response_mask = np.zeros((len(responses), length), bool)
    for row, ids in enumerate(encoded):
        tokens[row, : len(prompt) + len(ids)] = prompt + ids
        response_mask[row, len(prompt) : len(prompt) + len(ids)] = True
    mask = step_score_mask(
        jnp.asarray(tokens), tokenizer.delimiter_ids, *tokenizer.think_ids, jnp.asarray(response_mask)
    )
    assert np.asarray(mask).sum(axis=1).tolist() == [len(reasoning_steps(response)) for response in responses]
