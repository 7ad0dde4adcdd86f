"""Answer checking: extract the final answer of a response and compare it with the reference by mathematical meaning.

Hugging Face's math-verify does the mathematics: it finds answers in free text ("the final answer is $x$",
`\\(...\\)`, a last number or expression) and parses LaTeX and plain expressions into sympy, with sets, intervals,
tuples, matrices, percentages, units, multiple-choice letters and equations, then compares them numerically and
symbolically. It runs in worker processes with a deadline per request (`verify_worker`); nothing here or there calls
`eval`.

Ours, where math-verify has no equivalent:
- the response's answer is what follows its last `</think>` (the embedded task's `<think>...</think> 42`, R1-style
  summaries), and a `\\boxed{}` there is taken whole, braces matched; GSM8K's `#### 42` marks an answer too;
- bounded work: answers longer than `MAX_ANSWER_CHARS`, nested deeper than `MAX_NESTING` or with a huge integer
  power, and all but the last `MAX_TAIL_CHARS` of a response, never reach the parser; a request that outlives its
  deadline counts as wrong; garbage never raises;
- integers compare exactly in this process (the embedded task's answers): no worker starts for them.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence

import numpy as np

from metastone_jax.data.arithmetic import THINK_CLOSE
from metastone_jax.data.verify_worker import WorkerPool

MAX_ANSWER_CHARS = 300
MAX_NESTING = 8  # brackets of any kind; the LaTeX parser's time grows exponentially with nested braces
MAX_TAIL_CHARS = 4000
DEADLINE_S = 5.0  # per request (one extraction or one comparison), math-verify's own default per operation
# Workers check a batch's answers side by side; each parses one at a time, in tens of MB.
WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))

_INTEGER = re.compile(r"-?\d{1,64}")
# Exact integer powers sympy would compute digit by digit: towers (9^{9^{9}}) and exponents of 7+ digits.
_HUGE_POWER = re.compile(r"\^\s*\{?\s*\d+\s*\}?\s*\^\s*\{?\s*\d|\^\s*\{?\s*\d{7}")
GSM8K_MARKER = "####"
_OPENING, _CLOSING = "([{", ")]}"
_ASK_MATH_VERIFY = object()  # a case our own rules leave to math-verify

_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (braces matched), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for position in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[brace + 1 : position].strip()
    return None


def extract_answers(responses: Sequence[str]) -> list[str | None]:
    """The final answer of each response (see `extract_answer`), one worker round trip for the batch."""
    answers = [_extract_locally(response) for response in responses]
    remote = [row for row, answer in enumerate(answers) if answer is _ASK_MATH_VERIFY]
    tails = [_tail(responses[row])[-MAX_TAIL_CHARS:] for row in remote]
    for row, answer in zip(remote, _run([("extract", tail) for tail in tails])):
        answers[row] = answer
    return answers


def extract_answer(response: str) -> str | None:
    """Final answer of a response: in the text after its last </think>, the last \\boxed{}, else the text after
    GSM8K's ####, else a bare integer, else what math-verify finds there; None when there is none."""
    return extract_answers([response])[0]


def equivalences(predictions: Sequence[str | None], references: Sequence[str | None]) -> list[bool]:
    """is_equivalent for each pair, one worker round trip for the batch."""
    verdicts = [_compare_locally(p, r) for p, r in zip(predictions, references)]
    remote = [row for row, verdict in enumerate(verdicts) if verdict is _ASK_MATH_VERIFY]
    requests = [("equal", predictions[row].strip(), references[row].strip()) for row in remote]
    for row, verdict in zip(remote, _run(requests)):
        verdicts[row] = bool(verdict)
    return verdicts


def is_equivalent(prediction: str | None, reference: str | None) -> bool:
    """True when the answers mean the same mathematical object (math-verify's verdict, reference as the gold)."""
    return equivalences([prediction], [reference])[0]


def rewards(responses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """[len(responses)] float32: 1.0 where a response's final answer is equivalent to its reference, else 0.0."""
    return np.asarray(equivalences(extract_answers(responses), references), np.float32)


def reward(response: str, reference: str) -> float:
    """1.0 when the response's final answer is equivalent to the reference answer, else 0.0."""
    return float(rewards([response], [reference])[0])


def _tail(response: str) -> str:
    return response.rsplit(THINK_CLOSE, 1)[-1]


def _extract_locally(response: str):
    """The answer when our own rules find it (boxed, ####, a bare integer), else _ASK_MATH_VERIFY."""
    tail = _tail(response)
    boxed = extract_boxed(tail)
    if boxed is not None:
        return boxed
    if GSM8K_MARKER in tail:
        answer = tail.rsplit(GSM8K_MARKER, 1)[1].strip().split("\n", 1)[0].strip()
        if answer:
            return answer
    if _INTEGER.fullmatch(tail.strip().rstrip(".")):
        return tail.strip().rstrip(".")
    return _ASK_MATH_VERIFY if tail.strip() else None


def _compare_locally(prediction: str | None, reference: str | None):
    """The verdict when it needs no parser (missing, oversized or integer answers), else _ASK_MATH_VERIFY."""
    if not isinstance(prediction, str) or not isinstance(reference, str):
        return False
    prediction, reference = prediction.strip(), reference.strip()
    if not prediction or not reference or not _bounded(prediction) or not _bounded(reference):
        return False
    if _INTEGER.fullmatch(prediction) and _INTEGER.fullmatch(reference):
        return int(prediction) == int(reference)
    return _ASK_MATH_VERIFY


def _bounded(answer: str) -> bool:
    """Short and shallow enough for the parser to finish quickly."""
    if len(answer) > MAX_ANSWER_CHARS or _HUGE_POWER.search(answer):
        return False
    depth = deepest = 0
    for character in answer:
        if character in _OPENING:
            depth += 1
            deepest = max(deepest, depth)
        elif character in _CLOSING:
            depth -= 1
    return deepest <= MAX_NESTING


def start_workers() -> None:
    """Starts math-verify's worker processes in the background, so that the first answers our own rules leave to
    math-verify (e.g. a response without a final number) do not wait for their start."""
    _workers().start()


def _workers() -> WorkerPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool(size=WORKERS)
    return _pool


def _run(requests: list[tuple]) -> list:
    if not requests:
        return []
    return _workers().run(requests, DEADLINE_S)
