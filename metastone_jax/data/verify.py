"""Answer checking by mathematical equivalence: extract the final answer of a response and compare values.

Answers are parsed by a small recursive-descent parser into exact sympy numbers (never `eval`, never sympy's
own string parser, which evaluates Python). Work is bounded: long inputs and big powers are rejected, and any
garbage compares as not equivalent instead of raising.
"""

from __future__ import annotations

import re

import sympy

from metastone_jax.data.arithmetic import THINK_CLOSE

MAX_ANSWER_CHARS = 120
_MAX_EXPONENT = 64  # |p| of an exponent p/q
_MAX_POWER_BITS = 4096  # size bound on an exact rational power
_RELATIVE_TOLERANCE = 1e-30  # only for irrational values (sqrt, pi), compared at 50 significant digits

_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_TOKEN = re.compile(rf"\s*(?:({_NUMBER})|(sqrt|pi)|(\*\*|[-+*/^()]))")
_LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_SQRT = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_LATEX_WORDS = (("\\cdot", "*"), ("\\times", "*"), ("\\pi", "pi"), ("\\sqrt", "sqrt"), ("{", "("), ("}", ")"))
_LATEX_DROPPED = re.compile(
    r"\\text\s*\{[^{}]*\}|\\mbox\s*\{[^{}]*\}|\^\s*\{?\\circ\}?|\\left|\\right|\\[,!; ]|\\?%|\\?\$"
)


class _ParseError(ValueError):
    pass


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


def extract_answer(response: str) -> str | None:
    """Final answer of a response: text after the last </think>, a \\boxed{} in it, or else its last number."""
    tail = response.rsplit(THINK_CLOSE, 1)[-1]
    boxed = extract_boxed(tail)
    if boxed is not None:
        return boxed
    if THINK_CLOSE in response and _parse_value(tail) is not None:
        return tail.strip()
    numbers = _LAST_NUMBER.findall(tail)
    return numbers[-1].strip() if numbers else None


def is_equivalent(prediction: str | None, reference: str | None) -> bool:
    """True when both strings parse to the same number (integers, decimals, fractions, simple expressions)."""
    predicted_value, reference_value = _parse_value(prediction), _parse_value(reference)
    if predicted_value is None or reference_value is None:
        return False
    if predicted_value.is_Rational and reference_value.is_Rational:
        return bool(predicted_value == reference_value)
    try:
        difference = abs(complex(sympy.N(predicted_value - reference_value, 50)))
        scale = max(1.0, abs(complex(sympy.N(reference_value, 50))))
    except (TypeError, ValueError, OverflowError):
        return False
    return difference <= _RELATIVE_TOLERANCE * scale


def reward(response: str, reference: str) -> float:
    """1.0 when the response's final answer is equivalent to the reference answer, else 0.0."""
    return 1.0 if is_equivalent(extract_answer(response), reference) else 0.0


def _parse_value(text: str | None):
    """Exact sympy value of an answer string, or None when it is not a bounded, finite expression."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    try:
        value = _Parser(_normalize(text)).parse()
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError, TypeError):
        return None
    if value.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
        return None
    return value


def _normalize(text: str) -> str:
    """LaTeX and formatting to the plain grammar: fractions, sqrt, \\cdot, $, thousands commas, `x =`."""
    text = extract_boxed(text) or text
    text = _LATEX_DROPPED.sub("", text)
    previous = None
    while previous != text:  # a brace-free \frac or \sqrt first, so nested ones unfold from the inside
        previous = text
        text = _LATEX_SQRT.sub(r"sqrt((\1))", _LATEX_FRACTION.sub(r"((\1)/(\2))", text))
    for latex, plain in _LATEX_WORDS:
        text = text.replace(latex, plain)
    return _THOUSANDS_COMMA.sub("", text).split("=")[-1].strip().rstrip(".")


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/'|implicit) unary)*;
    unary := ('+'|'-') unary | power; power := atom (('^'|'**') unary)?; atom := number | pi | sqrt atom | ( expr )."""

    def __init__(self, text: str):
        self.tokens, position = [], 0
        text = text.strip()
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None:
                raise _ParseError(f"unexpected character at {position}")
            self.tokens.append(match.group(match.lastindex))
            position = match.end()
        self.position = 0

    def parse(self):
        if not self.tokens:
            raise _ParseError("empty")
        value = self._expression()
        if self.position != len(self.tokens):
            raise _ParseError("trailing tokens")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise _ParseError("unexpected end")
        self.position += 1
        return token

    def _expression(self):
        value = self._term()
        while self._peek() in ("+", "-"):
            value = value + self._term() if self._take() == "+" else value - self._term()
        return value

    def _term(self):
        value = self._unary()
        while True:
            token = self._peek()
            if token in ("*", "/"):
                self._take()
                right = self._unary()
                if token == "/" and right == 0:
                    raise ZeroDivisionError
                value = value * right if token == "*" else value / right
            elif token in ("(", "pi", "sqrt"):
                value = value * self._unary()  # implicit product: 2pi, 3(4), 2sqrt(2)
            else:
                return value

    def _unary(self):
        if self._peek() in ("+", "-"):
            return self._unary() if self._take() == "+" else -self._unary()
        return self._power()

    def _power(self):
        base = self._atom()
        if self._peek() not in ("^", "**"):
            return base
        self._take()
        exponent = self._unary()
        if not exponent.is_Rational or abs(exponent.p) > _MAX_EXPONENT or exponent.q > _MAX_EXPONENT:
            raise _ParseError("exponent too large or not rational")
        if base.is_Rational and (abs(base.p).bit_length() + base.q.bit_length()) * abs(exponent.p) > _MAX_POWER_BITS:
            raise _ParseError("power too large")
        if base == 0 and exponent < 0:
            raise ZeroDivisionError
        return base**exponent

    def _atom(self):
        token = self._take()
        if token == "(":
            value = self._expression()
            if self._take() != ")":
                raise _ParseError("unbalanced parenthesis")
            return value
        if token == "pi":
            return sympy.pi
        if token == "sqrt":
            return sympy.sqrt(self._atom())
        if token[0].isdigit() or token[0] == ".":
            return sympy.Rational(token)
        raise _ParseError(f"unexpected token {token!r}")
