"""The embedded task: multi-step integer arithmetic with step-by-step reference solutions.

A problem is a chain: start from a number, then apply `op operand` a few times. Each step is one line of
the reference solution, so the SPRM has natural steps to score. Every intermediate result stays an
integer in [0, max_value], which keeps the vocabulary to the numbers 0..max_value plus a few symbols.

Held-out questions: every question text belongs to one of two splits, "train" or "eval", decided by a stable hash
of the text alone (one text in `HELD_OUT_BUCKETS`, whatever the task's seed or knobs). `sample(i)` draws from the
train split and `sample(i, split="eval")` from the eval split, so no question a run trains on is ever an evaluation
question, however long the run. The space is small (2-4 operations on 1..9: a few thousand 2-step questions), so
drawing at far-apart indices alone would not do: identical texts recur at different indices.

Each reasoning step of a response can be checked: `step_correctness` splits the think span into the steps the SPRM
scores and checks each `a op b = c`.

Text conventions shared by the whole library (prompt, response, markers) live here too, because this
task is their reference user.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
STEP_DELIMITER = ".\n\n"
OPERATORS = ("+", "-", "*", "/")
SPLITS = ("train", "eval")
# One question text in this many is held out for evaluation (chosen by hash, see is_held_out).
HELD_OUT_BUCKETS = 16

# A chain can get stuck (e.g. only "-" allowed and the value reached 0) or land in the other split; such a draw
# is retried from the same random stream, so the sample stays a pure function of (seed, index, split). An eval
# draw succeeds with probability 1/16, so 1000 attempts fail with probability (15/16)^1000 < 1e-28.
_MAX_ATTEMPTS = 1000
# A step as the reference solutions write it: `a op b = c`, single spaces, non-negative integers.
_STEP_PATTERN = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def is_held_out(question: str) -> bool:
    """Whether a question text is in the eval split: the first 8 bytes of its SHA-256 modulo HELD_OUT_BUCKETS are 0."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def reasoning_steps(response: str) -> list[str]:
    """The steps of a response that the SPRM scores (models/sprm.py `step_score_mask`), as text without delimiters.

    The think span is the text after the last <think> (the whole response without one) up to the first </think>;
    a step is a piece of it that ends in the delimiter. Only the first delimiter of a run ends a step, and one
    directly after <think> ends none, so empty pieces are dropped except a leading one when there is no <think>.
    """
    opened = THINK_OPEN in response
    span = response.rsplit(THINK_OPEN, 1)[-1].split(THINK_CLOSE, 1)[0]
    pieces = span.split(STEP_DELIMITER)[:-1]  # the text after the last delimiter ends no step
    return [piece for index, piece in enumerate(pieces) if piece or (index == 0 and not opened)]


def check_step(step: str) -> bool:
    """Whether `step` is exactly `a op b = c` (single spaces, integers) with c the exact value of a op b.

    A malformed step is wrong; a division is right only when exact (b * c == a).
    """
    match = _STEP_PATTERN.fullmatch(step)
    if match is None:
        return False
    left, op, right, result = match.groups()
    left, right, result = int(left), int(right), int(result)
    if op == "/":
        return right != 0 and right * result == left
    return _apply(op, left, right) == result


def step_correctness(response: str) -> list[bool]:
    """[steps] whether each reasoning step of a response (see `reasoning_steps`) is right, in order."""
    return [check_step(step) for step in reasoning_steps(response)]


def format_prompt(question: str) -> str:
    """The prompt string given to the model for a question."""
    return f"{question}\n"


def format_response(steps: list[str], answer: str) -> str:
    """The reference response: each step ends with the delimiter, all inside <think>, then the answer."""
    reasoning = "".join(step + STEP_DELIMITER for step in steps)
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE} {answer}"


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Difficulty knobs and seed of the chained arithmetic task; `sample(i, split)` is pure in (seed, i, split)."""

    seed: int = 0
    num_steps: tuple[int, int] = (2, 4)  # inclusive range of operations per problem
    operand_range: tuple[int, int] = (1, 9)  # inclusive range of the start value and of every operand
    max_value: int = 99  # every intermediate result lies in [0, max_value]
    operators: tuple[str, ...] = OPERATORS

    def __post_init__(self):
        object.__setattr__(self, "num_steps", tuple(self.num_steps))
        object.__setattr__(self, "operand_range", tuple(self.operand_range))
        object.__setattr__(self, "operators", tuple(self.operators))
        low_steps, high_steps = self.num_steps
        low_operand, high_operand = self.operand_range
        if self.seed < 0:
            raise ValueError(f"ArithmeticTask.seed must be >= 0, got {self.seed}")
        if not 1 <= low_steps <= high_steps:
            raise ValueError(f"ArithmeticTask.num_steps must satisfy 1 <= low <= high, got {self.num_steps}")
        if not 1 <= low_operand <= high_operand:
            raise ValueError(f"ArithmeticTask.operand_range must satisfy 1 <= low <= high, got {self.operand_range}")
        if self.max_value < high_operand:
            raise ValueError(
                f"ArithmeticTask.max_value ({self.max_value}) must be >= the largest operand ({high_operand})"
            )
        unknown = [op for op in self.operators if op not in OPERATORS]
        if not self.operators or unknown:
            raise ValueError(
                f"ArithmeticTask.operators has unknown or no operators {unknown}; valid choices are {OPERATORS}"
            )
        for split in SPLITS:  # fails now, naming the knobs, if a split's chain cannot be built
            self.sample(0, split)

    def sample(self, index: int, split: str = "train") -> dict[str, str]:
        """Problem number `index` of a split: {"question", "answer", "solution"} (solution = full reference response).

        The number of operations is drawn first, then chains until one's question text is in `split`
        (`is_held_out` for "eval"), so each split keeps the task's distribution of problem lengths.
        """
        if index < 0:
            raise ValueError(f"ArithmeticTask.sample index must be >= 0, got {index}")
        if split not in SPLITS:
            raise ValueError(f"ArithmeticTask.sample split {split!r} is not one of {SPLITS}")
        rng = np.random.default_rng([self.seed, index])
        num_steps = int(rng.integers(self.num_steps[0], self.num_steps[1] + 1))
        for _ in range(_MAX_ATTEMPTS):
            chain = self._draw_chain(rng, num_steps)
            if chain is not None:
                problem = _render(*chain)
                if is_held_out(problem["question"]) == (split == "eval"):
                    return problem
        raise ValueError(
            f"ArithmeticTask could not build a {num_steps}-step chain of the {split} split with operators "
            f"{self.operators}, operand_range {self.operand_range} and max_value {self.max_value}; widen max_value "
            "or add operators"
        )

    def vocabulary(self) -> list[str]:
        """Every word the question and solution text can contain (numbers and symbols, without spaces)."""
        numbers = [str(n) for n in range(self.max_value + 1)]
        return numbers + list(OPERATORS) + ["=", "(", ")"]

    def _feasible_operands(self, op: str, value: int) -> np.ndarray:
        """Operands b for which `value op b` is an integer in [0, max_value]."""
        low, high = self.operand_range
        candidates = np.arange(low, high + 1)
        if op == "+":
            return candidates[value + candidates <= self.max_value]
        if op == "-":
            return candidates[candidates <= value]
        if op == "*":
            return candidates[value * candidates <= self.max_value]
        return candidates[value % candidates == 0]

    def _draw_chain(self, rng: np.random.Generator, num_steps: int):
        """(start, [(op, operand, result), ...]) or None when the chain got stuck."""
        value = int(rng.integers(self.operand_range[0], self.operand_range[1] + 1))
        start, operations = value, []
        for _ in range(num_steps):
            choices = [(op, operands) for op in self.operators if len(operands := self._feasible_operands(op, value))]
            if not choices:
                return None
            op, operands = choices[int(rng.integers(len(choices)))]
            operand = int(operands[int(rng.integers(len(operands)))])
            value = _apply(op, value, operand)
            operations.append((op, operand, value))
        return start, operations


def _apply(op: str, left: int, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    return left // right  # exact: only divisors are drawn


def _render(start: int, operations: list[tuple[str, int, int]]) -> dict[str, str]:
    """Question with the fewest parentheses that keep left-to-right order, plus the stepwise solution."""
    question, has_top_level_sum = str(start), False
    steps, value = [], start
    for op, operand, result in operations:
        if op in "*/" and has_top_level_sum:
            question, has_top_level_sum = f"({question})", False
        question = f"{question} {op} {operand}"
        has_top_level_sum = has_top_level_sum or op in "+-"
        steps.append(f"{value} {op} {operand} = {result}")
        value = result
    answer = str(value)
    return {"question": question, "answer": answer, "solution": format_response(steps, answer)}
