"""math-verify in worker processes that answer within a deadline, or are killed and count the answer as wrong.

Parsing LaTeX into sympy and comparing can take unbounded time on some inputs (nested braces make the parser
backtrack exponentially; `9^{9^{9}}` is one C-level integer power that no Python signal interrupts), and
math-verify's own timeouts use `signal.alarm`, which works only in the main thread. A separate process is the one
bound that holds everywhere: the parent sends one request, waits up to `deadline_s` for its answer, and on
expiry kills the worker (a fresh one starts on the next request).

This file is also the worker's program. It is started as `python -P <this file>` so that it imports only the
standard library and math-verify (not jax), and talks JSON lines: the parent writes ["extract", text] or
["equal", prediction, reference], the worker answers with the result.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

# A request's answer when its worker misses the deadline or dies: no answer extracted, not equivalent.
FALLBACK = {"extract": None, "equal": False}
_READY = "ready"
_MEMORY_LIMIT_BYTES = 4 << 30  # address space of a worker: a runaway power fails with MemoryError instead
# The LaTeX parser builds its tables the first time it meets each construct, much slower than later: a new worker
# meets the common ones before it reports ready, off the deadline's clock.
_WARM_UP = (
    ("\\frac{1}{2}", "0.5"),
    ("2 \\cdot 3 + 4^2 - 36 * 8 / 2", "-122"),
    ("\\sqrt{2} x^2 + \\pi", "x"),
    ("\\{1, 2\\}", "\\{2,1\\}"),
    ("[0, 1)", "(0,1]"),
    ("(1, 2)", "(1,2)"),
    ("10\\%", "0.1"),
    ("\\text{(B)}", "B"),
    ("x = 5", "5"),
)


class WorkerPool:
    """`size` worker processes, started on first use; `run(requests, deadline_s)` answers a batch, spread over the
    workers."""

    def __init__(self, size: int = 1, startup_s: float = 120.0):
        self._workers = [_Worker(startup_s) for _ in range(size)]
        atexit.register(self.close)

    def start(self) -> None:
        """Starts the worker processes now without waiting for them, so that their start (imports and warm-up, a
        second or two) overlaps the caller's work instead of delaying the first answers."""
        for worker in self._workers:
            worker.spawn()

    def run(self, requests: Sequence[tuple], deadline_s: float) -> list:
        """The answers of `requests`, in order; each one within `deadline_s` or its fallback."""
        results = [None] * len(requests)
        pending = iter(range(len(requests)))
        lock = threading.Lock()

        def drain(worker: _Worker) -> None:
            while True:
                with lock:
                    index = next(pending, None)
                if index is None:
                    return
                results[index] = worker.call(requests[index], deadline_s)

        busy = self._workers[: max(1, min(len(self._workers), len(requests)))]
        if len(busy) == 1:
            drain(busy[0])
        else:
            with ThreadPoolExecutor(len(busy)) as executor:
                list(executor.map(drain, busy))
        return results

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()


class _Worker:
    """One worker process and the parent's end of its pipes; one request at a time."""

    def __init__(self, startup_s: float):
        self.startup_s = startup_s
        self._process: subprocess.Popen | None = None
        self._ready = False
        self._buffer = b""
        self._lock = threading.Lock()

    def spawn(self) -> None:
        with self._lock:
            self._spawn()

    def call(self, request: tuple, deadline_s: float):
        with self._lock:
            if not self._ready:
                self._start()
            try:
                self._process.stdin.write(json.dumps(request).encode() + b"\n")
                self._process.stdin.flush()
                line = self._read_line(time.monotonic() + deadline_s)
            except (BrokenPipeError, EOFError):  # the worker died on this request (e.g. out of memory)
                line = None
            if line is None:
                self.stop()
                return FALLBACK[request[0]]
            return json.loads(line)

    def _spawn(self) -> None:
        if self._process is None:
            self._process = subprocess.Popen(
                [sys.executable, "-P", os.path.abspath(__file__)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            self._buffer = b""

    def _start(self) -> None:
        """Spawns the worker unless it was spawned already, and waits until it is ready."""
        self._spawn()
        try:
            line = self._read_line(time.monotonic() + self.startup_s)
        except EOFError:
            line = None
        if line is None or json.loads(line) != _READY:
            self.stop()
            raise RuntimeError(
                "the math-verify answer checker did not start (its error is printed above); "
                "install it with `pip install math-verify`"
            )
        self._ready = True

    def _read_line(self, deadline: float) -> bytes | None:
        """The next line from the worker, or None at the deadline; EOFError when the worker has exited."""
        descriptor = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([descriptor], [], [], remaining)[0]:
                return None
            chunk = os.read(descriptor, 1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.kill()
        self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            pipe.close()
        self._process = None
        self._ready = False


# ---------------------------------------------------------------------------------------------------------------------
# The worker's side.


def _serve() -> None:
    """Reads requests from stdin until it closes; answers each on the original stdout."""
    import resource

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft > _MEMORY_LIMIT_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT_BYTES, hard))
    handlers = _math_verify_handlers()
    for prediction, reference in _WARM_UP:
        handlers["equal"](prediction, reference)
    print(json.dumps(_READY), file=protocol)
    for line in sys.stdin:
        kind, *arguments = json.loads(line)
        try:
            result = handlers[kind](*arguments)
        except Exception:  # math-verify and sympy raise many types on malformed input; all mean "no answer"
            result = FALLBACK[kind]
        print(json.dumps(result), file=protocol)


def _math_verify_handlers() -> dict:
    """extract(text) -> the answer string math-verify finds; equal(prediction, reference) -> bool."""
    import logging
    from functools import lru_cache

    import math_verify.parser
    import sympy
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns once that we run without its timeouts

    def as_latex(text: str) -> str:
        """Plain-text operators (Python's power, the multiplication and division signs) as LaTeX."""
        return text.replace("**", "^").replace("×", "\\times ").replace("÷", "\\div ")

    # math-verify hands a plain expression it finds ("2*3+1") to sympy's parse_expr, which evaluates Python. Extraction
    # needs only its text, which `equal` then parses with the LaTeX parser: the expression stands for itself here.
    math_verify.parser.parse_expr_cached = lambda text: text

    def extract(text: str) -> str | None:
        # The string of the best-placed match is the answer whether or not it parses, so one parse is enough.
        found = parse(
            text,
            [LatexExtractionConfig(), ExprExtractionConfig()],
            fallback_mode="first_match",
            extraction_mode="first_match",
            parsing_timeout=None,
        )
        strings = [item for item in found if isinstance(item, str)]
        if strings:
            return strings[-1]
        return sympy.latex(found[0]) if found else None

    @lru_cache(maxsize=4096)
    def parse_answer(answer: str) -> list:
        return parse(f"\\boxed{{{as_latex(answer)}}}", [LatexExtractionConfig()], parsing_timeout=None)

    def equal(prediction: str, reference: str) -> bool:
        gold, target = parse_answer(reference), parse_answer(prediction)
        return bool(gold and target and verify(gold, target, timeout_seconds=None))

    return {"extract": extract, "equal": equal}


if __name__ == "__main__":
    try:
        _serve()
    except KeyboardInterrupt:
        pass
