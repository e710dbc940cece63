"""Bytes a compiled program hands to collectives, read from its HLO text (`collective_bytes`)."""

from __future__ import annotations

import math
import re

__all__ = ["collective_bytes"]

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "s4": 0.5,
    "u4": 0.5,
    "s2": 0.25,
    "u2": 0.25,
    "s1": 0.125,
    "u1": 0.125,
    "token": 0,
}
_COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
    "ragged-all-to-all",
)
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")


def _shape_bytes(shape_text: str) -> float:
    total = 0.0
    for dtype, dims in _SHAPE.findall(shape_text):
        if dtype.startswith("f8") or dtype.startswith("f4"):
            size = 1 if dtype.startswith("f8") else 0.5
        elif dtype in _DTYPE_BYTES:
            size = _DTYPE_BYTES[dtype]
        else:
            continue  # not a dtype (e.g. a layout tag)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _operand_names(args: str) -> list[str]:
    depth, end = 0, len(args)
    for i, ch in enumerate(args):  # the operand list ends at the ")" that closes the call
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                end = i
                break
            depth -= 1
    return re.findall(r"%([\w.\-]+)", args[:end])


def collective_bytes(program) -> dict[str, int]:
    """Bytes each device hands to collectives in one run of a compiled program, by kind.

    Parses the compiled HLO text (`jax.stages.Compiled`; a `Lowered` is compiled first; or the
    text itself): for every ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` and
    ``collective-permute`` (and their async ``-start`` forms), it sums the sizes of the operands
    (shape x dtype width, looked up where each operand is defined). That is the data a device
    contributes: n*4 bytes for a float32 all-reduce of n values, n/32*4 for an all-gather of the
    n/32 packed words of `onebit_allreduce`. (What travels on the wire also depends on the
    algorithm, e.g. a ring all-reduce moves 2(D-1)/D of its operand.) Returns
    ``{kind: bytes, ..., "total": bytes}``.
    """
    if hasattr(program, "compile"):  # a Lowered (a Compiled has no .compile)
        program = program.compile()
    text = program if isinstance(program, str) else program.as_text()
    shapes, calls = {}, []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, args = m.groups()
        shapes[name] = shape
        kind = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
        if kind in _COLLECTIVES:
            calls.append((kind, args))
    out = {kind: 0 for kind in _COLLECTIVES}
    for kind, args in calls:
        out[kind] += int(sum(_shape_bytes(shapes.get(op, "")) for op in _operand_names(args)))
    out["total"] = sum(out.values())
    return out
