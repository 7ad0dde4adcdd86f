"""Bytes on the wire, read from compiled HLO: the operand sizes of every collective, by kind and in total.

Counts each collective instruction once (a collective inside a loop body is not multiplied by the trip
count). Async pairs count at their `-start`; an `async-start` wrapper is skipped because the collective
inside the computation it calls is counted itself.
"""

from __future__ import annotations

import re
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")

# Bits per element; s4/u4 and friends are rounded up to whole bytes per element, as XLA stores them unpacked.
_ELEMENT_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1,
    "s4": 1, "u4": 1, "s2": 1, "u2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16,
}  # fmt: skip
# `%name = <shape> <opcode>(<operands>)...`; the shape may be a tuple with spaces inside.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY_SHAPE = re.compile(r"(\w+)\[([^\]]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")  # long operand lists carry /*index=5*/ markers


def _split_shape(rest: str) -> tuple[str, str]:
    """Splits `<shape> <opcode>(...)` into the shape text and what follows it."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    raise ValueError(f"unbalanced tuple shape in HLO line: {rest[:200]!r}")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as `f32[4,32]{1,0}` or a tuple of them (tokens and opaque count 0)."""
    total = 0
    for dtype, dims in _ARRAY_SHAPE.findall(shape):
        if dtype not in _ELEMENT_BYTES:
            continue
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim.strip().lstrip("<="))
        total += count * _ELEMENT_BYTES[dtype]
    return total


def _operands(call: str) -> list[str]:
    """The operand list of `opcode(a, b, ...)`, split at top-level commas."""
    inner, depth, start, parts = call[call.index("(") + 1 :], 0, 0, []
    for i, char in enumerate(inner):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                parts.append(inner[start:i])
                break
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    return [part.strip() for part in parts if part.strip()]


def _operand_bytes(operand: str, shapes: dict[str, str]) -> int:
    """An operand is `%name` (look its shape up) or `<shape> %name` (some HLO printers inline the shape)."""
    if _ARRAY_SHAPE.match(operand) or operand.startswith("("):
        return shape_bytes(operand.rsplit("%", 1)[0] if "%" in operand else operand)
    name = operand.lstrip("%")
    if name not in shapes:
        raise ValueError(f"wire_bytes: operand {operand!r} is not defined in the HLO module")
    return shape_bytes(shapes[name])


def wire_bytes(compiled: Any) -> dict[str, int]:
    """Operand bytes of every collective in `compiled` (a `jax.stages.Compiled` or its `as_text()`).

    Returns {kind: bytes for each of COLLECTIVES, "total": their sum}.
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    shapes, calls = {}, []
    for line in text.splitlines():
        match = _INSTRUCTION.match(_COMMENT.sub("", line))
        if not match:
            continue
        name, rest = match.groups()
        shape, tail = _split_shape(rest)
        shapes[name] = shape
        opcode = re.match(r"[\w\-]+", tail)
        if opcode:
            kind = opcode.group(0).removesuffix("-start")
            if kind in COLLECTIVES:
                calls.append((kind, tail))
    totals = dict.fromkeys(COLLECTIVES, 0)
    for kind, tail in calls:
        totals[kind] += sum(_operand_bytes(operand, shapes) for operand in _operands(tail))
    totals["total"] = sum(totals.values())
    return totals
