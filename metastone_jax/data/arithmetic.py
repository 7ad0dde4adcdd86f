"""The embedded task: multi-step integer arithmetic with step-by-step reference solutions.

A problem is a chain: start from a number, then apply `op operand` a few times. Each step is one line of
the reference solution, so the SPRM has natural steps to score. Every intermediate result stays an
integer in [0, max_value], which keeps the vocabulary to the numbers 0..max_value plus a few symbols.

Text conventions shared by the whole library (prompt, response, markers) live here too, because this
task is their reference user.
"""

from __future__ import annotations

import dataclasses

import numpy as np

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
STEP_DELIMITER = ".\n\n"
OPERATORS = ("+", "-", "*", "/")

# A chain can get stuck (e.g. only "-" allowed and the value reached 0); such a draw is retried from the
# same random stream, so the sample stays a pure function of (seed, index).
_MAX_ATTEMPTS = 100


def format_prompt(question: str) -> str:
    """The prompt string given to the model for a question."""
    return f"{question}\n"


def format_response(steps: list[str], answer: str) -> str:
    """The reference response: each step ends with the delimiter, all inside <think>, then the answer."""
    reasoning = "".join(step + STEP_DELIMITER for step in steps)
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE} {answer}"


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Difficulty knobs and seed of the chained arithmetic task; `sample(i)` is deterministic in (seed, i)."""

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
        self.sample(0)  # fails now, naming the knobs, if the chain cannot be built

    def sample(self, index: int) -> dict[str, str]:
        """Problem number `index`: {"question", "answer", "solution"} (solution = full reference response)."""
        if index < 0:
            raise ValueError(f"ArithmeticTask.sample index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        num_steps = int(rng.integers(self.num_steps[0], self.num_steps[1] + 1))
        for _ in range(_MAX_ATTEMPTS):
            chain = self._draw_chain(rng, num_steps)
            if chain is not None:
                return _render(*chain)
        raise ValueError(
            f"ArithmeticTask could not build a {num_steps}-step chain with operators {self.operators}, "
            f"operand_range {self.operand_range} and max_value {self.max_value}; widen max_value or add operators"
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
