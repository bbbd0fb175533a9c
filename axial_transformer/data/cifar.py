"""CIFAR-10's python version (`cifar-10-batches-py`) read without unpickling anything.

Each batch (`data_batch_1` .. `data_batch_5`, `test_batch`) is a Python 2 pickle of the dict
{b"batch_label": bytes, b"labels": [int] * N, b"data": uint8 array [N, 3072], b"filenames":
[bytes] * N}. Unpickling runs whatever a file says, and even an unpickler that admits only
numpy's own globals can be made to build an array of forged object pointers that crashes the
process. So `pickletools.genops` only parses the opcodes, and the small stack machine below builds
plain values from them. A global is never looked up: numpy's are kept as names, the calls to them
as `Call` records, never run, and the pixels are read from raw bytes with `np.frombuffer`.
"""

from __future__ import annotations

import io
import pickletools
import reprlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PIXELS = 3 * 32 * 32  # one image: the red, green and blue 32x32 planes
KEYS = {b"batch_label", b"labels", b"data", b"filenames"}
# A batch holds 10,000 images (about 31 MB); the file is read into memory whole, so that a length
# field in a hostile file can never ask for more bytes than the file holds.
MAX_BATCH_BYTES = 1 << 30

# What numpy's pickles of a uint8 array name, as written by numpy 1.x (Python 2) and 2.x.
NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                 ("numpy._core.multiarray", "_reconstruct"), ("numpy", "dtype")}


@dataclass(frozen=True)
class Global:  # a global the pickle names (one of NUMPY_GLOBALS), never looked up
    name: str


@dataclass
class Call:  # `func(*args)` as REDUCE asks for it, with BUILD's `state`; never run
    func: Global
    args: tuple
    state: object = None


# Python 2 `str` (the CIFAR files' keys, labels and pixels): genops gives it decoded as latin-1;
# unpickled with encoding="bytes" it is bytes.
PY2_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING"}
VALUES = {"INT", "BININT", "BININT1", "BININT2", "LONG1", "SHORT_BINBYTES", "BINBYTES",
          "BINBYTES8", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
NEW = {"NONE": lambda: None, "NEWTRUE": lambda: True, "NEWFALSE": lambda: False,
       "EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple}
TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def parse(raw: bytes) -> object:
    """The value a pickle describes, built from plain values and `Call` records only; anything
    else (another opcode or global, a malformed or truncated stream) is a ValueError."""
    stack: list = []
    marks: list[int] = []  # where each open MARK sits on the stack
    memo: dict = {}

    def pop(n: int = 1) -> list:
        if len(stack) - n < (marks[-1] if marks else 0):
            raise ValueError("malformed pickle (stack underflow)")
        items = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return items

    def pop_to_mark() -> list:
        if not marks:
            raise ValueError("malformed pickle (no mark)")
        return pop(len(stack) - marks.pop())

    def top(kind: type) -> object:
        if len(stack) <= (marks[-1] if marks else 0) or not isinstance(stack[-1], kind):
            raise ValueError(f"malformed pickle (expected a {kind.__name__} on the stack)")
        return stack[-1]

    # genops raises ValueError for a malformed or truncated stream.
    for op, arg, pos in pickletools.genops(io.BytesIO(raw)):
        name = op.name
        if name == "PROTO" and arg > 4:  # protocol 5 pickles arrays in out-of-band buffers
            raise ValueError(f"pickle protocol {arg}, expected 2 to 4")
        elif name in ("PROTO", "FRAME"):
            pass
        elif name in PY2_STRINGS:
            stack.append(arg.encode("latin-1"))
        elif name in VALUES:
            stack.append(arg)
        elif name in NEW:
            stack.append(NEW[name]())
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "TUPLE":
            stack.append(tuple(pop_to_mark()))
        elif name in TUPLE_SIZES:
            stack.append(tuple(pop(TUPLE_SIZES[name])))
        elif name in ("APPEND", "APPENDS"):
            values = pop() if name == "APPEND" else pop_to_mark()
            top(list).extend(values)
        elif name in ("SETITEM", "SETITEMS"):
            items = pop(2) if name == "SETITEM" else pop_to_mark()
            if len(items) % 2 or not all(isinstance(k, (bytes, str, int)) for k in items[::2]):
                raise ValueError("malformed pickle (dict keys must be bytes, str or int)")
            top(dict).update(zip(items[::2], items[1::2], strict=True))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = top(object)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise ValueError(f"malformed pickle (memo entry {arg} is not set)")
            stack.append(memo[arg])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            module, attribute = arg.split(" ", 1) if name == "GLOBAL" else pop(2)
            if not all(isinstance(part, str) for part in (module, attribute)) or (
                module, attribute
            ) not in NUMPY_GLOBALS:
                raise ValueError(f"refused global {reprlib.repr(module)}."
                                 f"{reprlib.repr(attribute)}")
            stack.append(Global(attribute))
        elif name == "REDUCE":
            func, args = pop(2)
            if not isinstance(func, Global) or not isinstance(args, tuple):
                raise ValueError("malformed pickle (REDUCE needs a global and a tuple)")
            stack.append(Call(func, args))
        elif name == "BUILD":
            state = pop()[0]
            call = top(Call)
            if call.state is not None:
                raise ValueError("malformed pickle (BUILD twice)")
            call.state = state
        elif name == "STOP":
            return pop()[0]
        else:
            raise ValueError(f"unexpected pickle opcode {name} at byte {pos}")
    raise ValueError("malformed pickle (no STOP)")


def uint8_rows(value: object) -> np.ndarray:
    """The uint8 array [N, 3072] that `_reconstruct(ndarray, (0,), b"b")` with the state
    `(1, (N, 3072), dtype("u1"), False, raw bytes)` describes, without building anything else."""
    if not (isinstance(value, Call) and value.func == Global("_reconstruct")
            and value.args[:1] == (Global("ndarray"),)
            and isinstance(value.state, tuple) and len(value.state) == 5):
        raise ValueError("b'data' is not a numpy array")
    _, shape, dtype, fortran_order, raw = value.state
    if not (isinstance(dtype, Call) and dtype.func == Global("dtype")
            and dtype.args[:1] in (("u1",), (b"u1",))):
        raise ValueError("b'data' is not a uint8 array")
    if not (isinstance(shape, tuple) and len(shape) == 2 and shape[1] == PIXELS
            and isinstance(shape[0], int) and shape[0] > 0):
        raise ValueError(f"b'data' has shape {reprlib.repr(shape)}, expected (N, {PIXELS})")
    if fortran_order is not False or not isinstance(raw, bytes) or len(raw) != shape[0] * PIXELS:
        raise ValueError(f"b'data' does not hold {shape[0]} x {PIXELS} bytes in C order")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def read_python_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [N, 3072] as R, G, B planes, labels int64 [N]) of one python batch;
    anything but a batch's own structure is a ValueError naming the file."""
    try:
        size = file.stat().st_size
        if size > MAX_BATCH_BYTES:
            raise ValueError(f"{size:,} bytes, a batch is about 31 MB")
        batch = parse(file.read_bytes())
        if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch) <= KEYS:
            found = reprlib.repr(list(batch)) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"expected a dict with keys {sorted(KEYS)}, found {found}")
        pixels, labels = uint8_rows(batch[b"data"]), batch[b"labels"]
        if not (isinstance(labels, list) and len(labels) == len(pixels) and all(
            type(label) is int and 0 <= label < 10 for label in labels
        )):
            raise ValueError(f"b'labels' must be a list of {len(pixels)} ints 0..9")
    except ValueError as e:
        raise ValueError(f"{file}: not a CIFAR-10 python batch ({e}); the binary version "
                         "(cifar-10-batches-bin) needs no pickle at all") from None
    return pixels, np.asarray(labels, dtype=np.int64)
