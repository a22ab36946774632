"""Reads a pickle's data without unpickling it: nothing is imported, constructed or called.

`load` runs the pickle machine over `pickletools.genops` with every global replaced by a
`Global` (its module and name, never looked up) and every call (REDUCE, NEWOBJ) by a `Call`
(the callable and its arguments, never called; BUILD stores the state on it). Only plain
data opcodes are understood (protocols 2-5: numbers, strings, bytes, tuples, lists, dicts,
the memo); any other opcode stops the read with its name. So a pickle from an untrusted
package can be read like a data file.

`dataframe_column` finds one column of a pickled pandas DataFrame (BlockManager layout,
pandas ≥ 0.14) in that inert tree, without pandas or numpy.
"""

from __future__ import annotations

import dataclasses
import pickletools


@dataclasses.dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclasses.dataclass(eq=False)
class Call:
    func: object
    args: tuple
    state: object = None


_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
            "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8", "SHORT_BINSTRING", "BINSTRING"}
_NUMBERS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def load(data: bytes) -> object:
    """The object tree the pickle `data` describes, with globals and calls left inert."""
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for op, arg, pos in pickletools.genops(data):
        name = op.name
        if name in _STRINGS or name in _NUMBERS:
            stack.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in _MEMO_GET:
            stack.append(memo[arg])
        elif name in _MEMO_PUT:
            memo[arg] = stack[-1]
        elif name in _CONSTANTS:
            stack.append(_CONSTANTS[name])
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        elif name == "APPEND":
            item = stack.pop()
            stack[-1].append(item)
        elif name == "SETITEMS":
            items = pop_mark()
            stack[-1].update(zip(items[::2], items[1::2]))
        elif name == "SETITEM":
            value = stack.pop()
            key = stack.pop()
            stack[-1][key] = value
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE"):
            stack.append({"EMPTY_LIST": [], "EMPTY_DICT": {}, "EMPTY_TUPLE": ()}[name])
        elif name in _TUPLE_N:
            n = _TUPLE_N[name]
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "LIST":
            stack.append(pop_mark())
        elif name == "DICT":
            items = pop_mark()
            stack.append(dict(zip(items[::2], items[1::2])))
        elif name == "STACK_GLOBAL":
            qualname = stack.pop()
            stack.append(Global(stack.pop(), qualname))
        elif name == "GLOBAL":
            module, qualname = arg.split(" ", 1)
            stack.append(Global(module, qualname))
        elif name in ("REDUCE", "NEWOBJ"):
            args = stack.pop()
            stack.append(Call(stack.pop(), args))
        elif name == "BUILD":
            state = stack.pop()
            if not isinstance(stack[-1], Call):
                raise ValueError(f"pickle BUILD at byte {pos} on a {type(stack[-1]).__name__}, not a call")
            stack[-1].state = state
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "STOP":
            return stack.pop()
        elif name not in ("PROTO", "FRAME"):
            raise ValueError(f"pickle opcode {name} at byte {pos} is not a plain data opcode; refusing to read it")
    raise ValueError("pickle ends without STOP")


def _named(obj: object, name: str, what: str) -> Call:
    if not (isinstance(obj, Call) and isinstance(obj.func, Global) and obj.func.name == name):
        raise ValueError(f"pickled DataFrame layout: expected {what} ({name}), found {obj!r:.200}")
    return obj


def ndarray_items(obj: object) -> list:
    """The elements of a pickled object ndarray (`numpy…_reconstruct` + state), in C order
    (numpy writes an object array's elements in C order whatever its memory layout)."""
    array = _named(obj, "_reconstruct", "a numpy array")
    _version, shape, _dtype, _fortran, items = array.state
    if not isinstance(items, list):
        raise ValueError(f"pickled DataFrame layout: expected an object array, found raw data of shape {shape}")
    return items


def _locations(locs: object) -> list[int]:
    if isinstance(locs, Call) and isinstance(locs.func, Global) and locs.func.name == "slice":
        start, stop, step = locs.args
        return list(range(start or 0, stop, step or 1))
    raise ValueError(f"pickled DataFrame layout: unsupported block locations {locs!r:.200}")


def dataframe_column(data: bytes, column: str) -> list:
    """The values of `column` of the pandas DataFrame pickled in `data`, read inertly."""
    frame = _named(load(data), "DataFrame", "a DataFrame")
    manager = _named(frame.state["_data"], "BlockManager", "its BlockManager")
    layout = next((v for part in manager.state if isinstance(part, dict) for v in part.values()
                   if isinstance(v, dict) and {"axes", "blocks"} <= set(v)), None)
    if layout is None:
        raise ValueError("pickled DataFrame layout: no {axes, blocks} state (pandas < 0.14?)")
    columns_index, rows_index = layout["axes"]
    columns = ndarray_items(_named(columns_index, "_new_Index", "the column index").args[1]["data"])
    rows = _named(rows_index, "_new_Index", "the row index").args[1]
    num_rows = (rows["stop"] - rows["start"]) // rows["step"]
    if column not in columns:
        raise ValueError(f"pickled DataFrame has no column {column!r}; its columns are {columns}")
    where = columns.index(column)
    for block in layout["blocks"]:
        locs = _locations(block["mgr_locs"])
        if where in locs:
            values = ndarray_items(block["values"])
            k = locs.index(where)
            out = values[k * num_rows:(k + 1) * num_rows]
            if len(values) != len(locs) * num_rows:
                raise ValueError(f"pickled DataFrame block of {len(values)} values for {len(locs)} columns "
                                 f"× {num_rows} rows")
            return out
    raise ValueError(f"pickled DataFrame: no block holds column {column!r}")
