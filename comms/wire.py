"""Bytes on the wire, read from compiled HLO: the operand sizes of every collective, by kind and in total, or by the
mesh axes the collective runs over.

Counts each collective instruction once (a collective inside a loop body is not multiplied by the trip
count). Async pairs count at their `-start`; an `async-start` wrapper is skipped because the collective
inside the computation it calls is counted itself.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

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


def _collectives(compiled: Any) -> list[tuple[str, int, str, bool]]:
    """(kind, operand bytes, the rest of the instruction, whether it crosses slices) of every collective.

    In a program compiled for several TPU slices, a collective across slices is a `send` to XLA's megascale
    runtime (its kind in the attribute `_xla_megascale_transfer_type`), whose `recv` brings the result back.
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
        if not opcode:
            continue
        kind = opcode.group(0).removesuffix("-start")
        across = _ACROSS_SLICES.search(tail) if kind == "send" else None
        if kind in COLLECTIVES:
            calls.append((kind, tail, _operands(tail), False))
        elif across:
            calls.append((across.group(1).lower().replace("_", "-"), tail, _operands(tail)[:1], True))
    return [
        (kind, sum(_operand_bytes(op, shapes) for op in operands), tail, across)
        for kind, tail, operands, across in calls
    ]


def wire_bytes(compiled: Any) -> dict[str, int]:
    """Operand bytes of every collective in `compiled` (a `jax.stages.Compiled` or its `as_text()`).

    Returns {kind: bytes for each of COLLECTIVES, "total": their sum}.
    """
    totals = dict.fromkeys(COLLECTIVES, 0)
    for kind, size, _, _ in _collectives(compiled):
        totals[kind] = totals.get(kind, 0) + size
    totals["total"] = sum(totals.values())
    return totals


def wire_bytes_by_axes(compiled: Any, mesh_shape: dict[str, int]) -> dict[str, int]:
    """Operand bytes of the collectives by the mesh axes their device groups span, e.g. {"data": .., "fsdp": ..};
    a collective over several axes counts under their names joined by "+" (in mesh order), and one across TPU
    slices under "slices".

    `mesh_shape` ({axis: size}, in order) is the mesh of the devices the program was compiled for: device ids in the
    HLO are positions in its row-major device order (of one slice's part of the mesh, for several slices).
    Collectives whose groups hold one device move nothing and are left out.
    """
    sizes = tuple(mesh_shape.values())
    totals: dict[str, int] = {}
    for _, size, tail, across in _collectives(compiled):
        groups = [] if across else _device_groups(tail, math.prod(sizes))
        coordinates = [np.array(np.unravel_index(np.asarray(group), sizes)) for group in groups]
        spanned = [list(mesh_shape)[i] for i in range(len(sizes)) if any(len(set(c[i])) > 1 for c in coordinates)]
        label = "slices" if across else "+".join(spanned)
        if label:
            totals[label] = totals.get(label, 0) + size
    return totals


_ACROSS_SLICES = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_GROUP_LIST = re.compile(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,\s]*\},?\s*)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _device_groups(tail: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective, from any of XLA's spellings: explicit lists (or collective-permute's
    source-target pairs), iota tiles `[groups,size]<=[dims]T(perm)`, or named-mesh groups
    `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`; no groups means all devices."""
    if match := _IOTA_GROUPS.search(tail):
        shape, dims, perm = ([int(x) for x in g.split(",")] if g else None for g in match.groups())
        ids = np.arange(math.prod(dims)).reshape(dims)
        return (ids.transpose(perm) if perm else ids).reshape(shape).tolist()
    if match := _MESH_GROUPS.search(tail):
        axes = dict(re.findall(r"'(\w+)'=(\d+)", match.group(1)))
        spanned = re.findall(r"'(\w+)'", match.group(2))
        ids = np.arange(num_devices).reshape([int(n) for n in axes.values()])
        order = [i for i, name in enumerate(axes) if name not in spanned] + [list(axes).index(n) for n in spanned]
        span = math.prod(int(axes[n]) for n in spanned)
        return ids.transpose(order).reshape(-1, span).tolist()
    if (match := _GROUP_LIST.search(tail)) and match.group(1).strip():
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", match.group(1))]
    return [list(range(num_devices))]
