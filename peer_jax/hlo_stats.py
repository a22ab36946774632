"""Collective traffic of a compiled XLA program, read from its optimised HLO text.

``collective_bytes(compiled.as_text())`` lists every collective instruction (all-gather,
reduce-scatter, all-reduce, all-to-all, collective-permute, and their async ``-start`` forms)
reachable from the entry computation and adds up, per kind, how many run per call of the
program and how many bytes each moves *per device*:

* bytes of one instruction = max(its operands' bytes, its results' bytes): the shard a device
  sends into an all-gather is smaller than what it receives, a reduce-scatter the other way
  round; an all-reduce's operands and results are the same size. Combined collectives (tuples)
  count every array. The TPU compiler's reduce-scatter fusion ('all-reduce-scatter', an
  all-reduce of the whole operand inside) counts as a reduce-scatter. Its asynchronous
  collectives (a fusion 'async-collective-start', continuation fusions that advance the
  transfer alongside compute, often inside a loop, and 'async-collective-done', each holding a
  copy of the collective instruction) count once, at the start.
* instructions inside a ``while`` body count once per iteration: ``known_trip_count`` from the
  while's backend config (CPU programs), else the counted-loop form JAX emits for scans and
  fori loops (counter from constant 0, condition ``counter < constant N``; TPU programs drop
  the backend config). A loop of neither form counts once and is listed under
  ``unknown_trip_count_loops``. Nested loops multiply; instructions in called computations
  (``call``, ``to_apply``, conditionals' branches, async wrappers) count once per call.

This is the data a device puts on or takes off the interconnect per step, not wire time: it
ignores the algorithm (ring, tree), the topology and any overlap with compute.
"""

from __future__ import annotations

import collections
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
          "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_COMP_END = re.compile(r'^\}\s*(?:,\s*execution_thread="[^"]*")?\s*$')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _array_bytes(text: str) -> list[int]:
    return [_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _ARRAY.findall(text)
            if dt in _BYTES]


def _parse(hlo_text: str):
    """{computation: [(name, result_type, opcode, rest)]}, the entry computation's name."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = _COMP_HEAD.match(line)
        if head and not line.startswith(" "):
            current = head.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if _COMP_END.match(line):  # (a line like '}}, metadata=...' continues a multi-line instruction)
            current = None
            continue
        if current is not None:
            m = _INSTR.match(line)
            if m:
                comps[current].append(m.groups())
    return comps, entry


def _counted_loop_trips(comps, comp: str, rest: str) -> int | None:
    """Trip count of a while loop compiled without `known_trip_count` (TPU programs): the
    counted loop JAX emits for scans and fori loops, i.e. a condition whose root is
    `tuple[0] < constant N` and an initial tuple whose element 0 is `constant(0)`; the body's
    +1 step is JAX's lowering. None when the loop does not have this form."""
    instrs = {name: (op, r) for name, _, op, r in comps.get(comp, ())}
    cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
    init = re.match(r"\s*%?([\w.\-]+)\s*\)", rest)
    if not cond or not init or instrs.get(init.group(1), ("",))[0] != "tuple":
        return None
    first = re.match(r"\s*%?([\w.\-]+)", instrs[init.group(1)][1])
    start = instrs.get(first.group(1)) if first else None
    for _ in range(8):  # through the copies the TPU compiler puts between a constant and its use
        if start is None or start[0] not in ("copy", "copy-start", "copy-done", "bitcast"):
            break
        source = re.match(r"\s*%?([\w.\-]+)", start[1])
        start = instrs.get(source.group(1)) if source else None
    if start is None or start[0] != "constant" or not re.match(r"\s*0\s*\)", start[1]):
        return None
    body = {name: (op, r) for name, _, op, r in comps.get(cond.group(1), ())}
    roots = [(op, r) for op, r in body.values() if op == "compare" and "direction=LT" in r]
    if len(roots) != 1:
        return None
    operands = re.findall(r"%([\w.\-]+)", roots[0][1].split(")", 1)[0])
    if len(operands) != 2:
        return None
    counter, bound = (body.get(o, ("", "")) for o in operands)
    limit = re.match(r"\s*(\d+)\s*\)", bound[1]) if bound[0] == "constant" else None
    if counter[0] != "get-tuple-element" or "index=0" not in counter[1] or limit is None:
        return None
    return int(limit.group(1))


def collective_bytes(hlo_text: str) -> dict:
    """{'by_kind': {kind: {'count', 'bytes'}}, 'total_bytes', 'unknown_trip_count_loops'} per
    device per call of the program (module docstring)."""
    comps, entry = _parse(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text() of a compiled program.")
    sizes = {comp: {name: sum(_array_bytes(rtype)) for name, rtype, _, _ in instrs} for comp, instrs in comps.items()}
    totals = {k: {"count": 0, "bytes": 0} for k in KINDS}
    unknown = collections.Counter()

    def visit(comp: str, times: int, depth: int = 0) -> None:
        if depth > 64:  # malformed or recursive text; XLA programs are acyclic
            raise ValueError(f"computation nesting deeper than 64 at {comp!r}")
        # The TPU compiler writes a reduce-scatter as a fusion 'all-reduce-scatter' around an
        # all-reduce of the whole operand: count that all-reduce as the reduce-scatter it is.
        as_reduce_scatter = comp.startswith("all-reduce-scatter")
        for name, rtype, op, rest in comps.get(comp, ()):
            start = op.endswith("-start")
            kind = op[: -len("-start")] if start else op
            if kind in KINDS:
                operands = rest.split(")", 1)[0]
                sent = sum(sizes[comp].get(o, 0) for o in re.findall(r"%([\w.\-]+)", operands))
                # A combined collective returns a tuple of results; an async -start returns
                # (operands..., results..., [context]): take its operands back out.
                received = sum(_array_bytes(rtype)) - (sent if start else 0)
                kind = "reduce-scatter" if as_reduce_scatter and kind == "all-reduce" else kind
                totals[kind]["count"] += times
                totals[kind]["bytes"] += times * max(sent, received)
                continue
            if op == "while":
                body = re.search(r"\bbody=%?([\w.\-]+)", rest)
                trip = _TRIP.search(rest)
                n = int(trip.group(1)) if trip else _counted_loop_trips(comps, comp, rest)
                if n is None:
                    unknown[name] += 1
                if body:
                    visit(body.group(1), times * (1 if n is None else n), depth + 1)
                continue
            if op == "fusion" and (name.startswith("async-collective-done") or '"continuation_config"' in rest):
                continue  # the TPU compiler's async collective: counted once, at its start fusion
            for called in re.findall(r"\b(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)", rest):
                visit(called, times, depth + 1)
            branches = re.search(r"\bbranch_computations=\{([^}]*)\}", rest)
            if branches:
                for called in re.findall(r"%?([\w.\-]+)", branches.group(1)):
                    visit(called, times, depth + 1)

    visit(entry, 1)
    return {"by_kind": totals, "total_bytes": sum(v["bytes"] for v in totals.values()),
            "unknown_trip_count_loops": sorted(unknown)}
