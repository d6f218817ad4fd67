"""What a pickle would do if loaded, read from its opcodes (pickletools) without loading it.

A small symbolic machine follows the opcodes: it builds tuples, lists and dicts
of the constants it meets, and for GLOBAL/STACK_GLOBAL, REDUCE, NEWOBJ, INST,
OBJ and BUILD it records *what would be imported and called* instead of doing
it. Nothing is ever imported, constructed or executed. From that come the
imports (``globals``), the strings, and torch's tensors (the
``_rebuild_tensor_v2`` calls on persistent storages) with their shapes.
"""
from __future__ import annotations

import pickletools
from dataclasses import dataclass, field

from .limits import LimitExceeded
from .sniff import reader

# Tensors and plain containers: what torch.load(weights_only=True) would accept and more narrowly.
PLAIN = {
    "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
    "builtins.bytearray", "_codecs.encode", "torch.Size", "torch.device",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_device_tensor_from_numpy", "torch._tensor._rebuild_from_type_v2",
    "torch.nn.parameter.Parameter", "torch.Tensor", "torch.storage.UntypedStorage", "torch.storage.TypedStorage",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
}
TORCH_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "qint8", "quint8", "qint32",
                "strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format"}
# Whole objects of libraries (a pickled nn.Module, saved arguments): not code of the export's
# own, but not plain data either, so a reviewer looks; anything else is code.
LIBRARY_PREFIXES = ("torch.nn.modules.", "torchvision.models.", "torch.optim.", "timm.models.")
LIBRARY = {"argparse.Namespace", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath",
           "collections.defaultdict", "collections.Counter", "datetime.datetime", "datetime.date",
           "datetime.timedelta", "torch.nn.parameter.Buffer", "builtins.range"}
STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


def classify(name: str) -> str:
    """'plain', 'library' or 'code' for an import ``module.name`` a pickle makes."""
    if name.startswith("__builtin__."):  # protocol 2 writes Python 2's name of builtins
        name = "builtins." + name[len("__builtin__."):]
    module = name.rsplit(".", 1)[0]
    if name in PLAIN or (module == "torch" and (name.endswith("Storage") or name[6:] in TORCH_DTYPES)) \
            or module == "numpy.dtypes":
        return "plain"
    if name in LIBRARY or name.startswith(LIBRARY_PREFIXES):
        return "library"
    return "code"


@dataclass(frozen=True)
class Global:
    name: str


@dataclass(frozen=True)
class Call:
    func: object
    args: object


@dataclass(frozen=True)
class PersId:
    value: object


class _Mark:
    pass


MARK = _Mark()


@dataclass
class Tensor:
    storage_key: str
    dtype: str  # numpy's name
    offset: int  # in elements
    shape: tuple[int, ...]
    storage_numel: int | None


@dataclass
class PickleFacts:
    globals: list[str] = field(default_factory=list)  # imports, in order, each once
    strings: list[str] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    storages: dict[str, int] = field(default_factory=dict)  # persistent storage key -> numel (legacy format)
    end: int = 0  # the offset after STOP
    error: str | None = None

    def code(self) -> list[str]:
        return [g for g in self.globals if classify(g) == "code"]

    def library(self) -> list[str]:
        return [g for g in self.globals if classify(g) == "library"]


_PUSH_ARG = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING",
             "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
             "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}


def read(data, start: int = 0, max_ops: int = 5_000_000, max_strings: int = 100_000) -> PickleFacts:
    """Follow one pickle in ``data`` from ``start`` to its STOP."""
    facts = PickleFacts()
    stack: list = []
    memo: dict = {}
    seen: set[str] = set()

    def pop_mark() -> list:
        items = []
        while stack and stack[-1] is not MARK:
            items.append(stack.pop())
        if not stack:
            raise ValueError("MARK missing")
        stack.pop()
        return items[::-1]

    def use(name: str) -> Global:
        if name not in seen:
            seen.add(name)
            facts.globals.append(name)
        return Global(name)

    try:
        f = reader(data)
        f.seek(start)
        for count, (op, arg, pos) in enumerate(pickletools.genops(f)):
            if count > max_ops:
                raise LimitExceeded(f"a pickle of more than {max_ops} opcodes")
            name = op.name
            if name in _PUSH_ARG:
                if isinstance(arg, str) and len(facts.strings) < max_strings:
                    facts.strings.append(arg)
                elif isinstance(arg, (bytes, bytearray)) and len(facts.strings) < max_strings and len(arg) < 4096:
                    facts.strings.append(arg.decode("latin-1"))
                stack.append(arg)
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE", "EMPTY_SET"):
                stack.append({"EMPTY_LIST": [], "EMPTY_DICT": {}, "EMPTY_TUPLE": (), "EMPTY_SET": []}[name])
            elif name == "MARK":
                stack.append(MARK)
            elif name in ("TUPLE", "LIST", "FROZENSET"):
                items = pop_mark()
                stack.append(tuple(items) if name == "TUPLE" else items)
            elif name == "DICT":
                items = pop_mark()
                stack.append(_pairs_dict(items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = stack[-n:]
                del stack[-n:]
                stack.append(tuple(items))
            elif name == "APPEND":
                item = stack.pop()
                if isinstance(stack[-1], list):
                    stack[-1].append(item)
            elif name in ("APPENDS", "ADDITEMS"):
                items = pop_mark()
                if isinstance(stack[-1], list):
                    stack[-1].extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                if isinstance(stack[-1], dict):
                    _set(stack[-1], key, value)
            elif name == "SETITEMS":
                items = pop_mark()
                if isinstance(stack[-1], dict):
                    for k, v in _pairs(items):
                        _set(stack[-1], k, v)
            elif name == "GLOBAL":
                module, _, attr = arg.partition(" ")
                stack.append(use(f"{module}.{attr}"))
            elif name == "INST":
                module, _, attr = arg.partition(" ")
                stack.append(Call(use(f"{module}.{attr}"), tuple(pop_mark())))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                if not isinstance(attr, str) or not isinstance(module, str):
                    stack.append(use("<an import whose name is computed>"))
                else:
                    stack.append(use(f"{module}.{attr}"))
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                if not isinstance(func, Global):
                    use("<a call of something not imported by name>")
                stack.append(_reduce(facts, func, args))
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                if name == "NEWOBJ_EX":
                    stack.pop()
                args, cls = stack.pop(), stack.pop()
                if not isinstance(cls, Global):
                    use("<an object of a class not imported by name>")
                stack.append(Call(cls, args))
            elif name == "OBJ":
                items = pop_mark()
                if not items or not isinstance(items[0], Global):
                    use("<an object of a class not imported by name>")
                stack.append(Call(items[0] if items else None, tuple(items[1:])))
            elif name == "BUILD":
                stack.pop()
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg))
            elif name == "PERSID":
                stack.append(_persid(facts, arg))
            elif name == "BINPERSID":
                stack.append(_persid(facts, stack.pop()))
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("EXT1", "EXT2", "EXT4"):
                stack.append(use(f"<an import from the copyreg extension registry, code {arg}>"))
            elif name in ("NEXT_BUFFER", "READONLY_BUFFER"):
                stack.append(None) if name == "NEXT_BUFFER" else None
            elif name == "STOP":
                facts.end = pos + 1
                return facts
            elif name in ("PROTO", "FRAME"):
                pass
            else:
                raise ValueError(f"opcode {name} not followed")
        facts.error = "a pickle without STOP"
    except LimitExceeded:
        raise
    except (ValueError, IndexError, KeyError, TypeError, EOFError) as e:
        facts.error = f"not a well-formed pickle ({type(e).__name__}: {str(e)[:80]})"
    return facts


def _pairs(items: list) -> list[tuple]:
    return list(zip(items[0::2], items[1::2]))


def _pairs_dict(items: list) -> dict:
    out: dict = {}
    for k, v in _pairs(items):
        _set(out, k, v)
    return out


def _set(d: dict, key, value) -> None:
    try:
        d[key] = value
    except TypeError:  # an unhashable symbolic key (a list): keep the value under its position
        d[len(d)] = value


def _persid(facts: PickleFacts, value) -> PersId:
    # torch: ('storage', <storage class>, key, location, numel[, view metadata])
    if isinstance(value, tuple) and len(value) >= 5 and value[0] == "storage" and isinstance(value[2], str):
        if isinstance(value[4], int):
            facts.storages[value[2]] = value[4]
    return PersId(value)


def _reduce(facts: PickleFacts, func, args):
    call = Call(func, args)
    if isinstance(func, Global) and func.name in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor",
                                                  "torch._utils._rebuild_tensor_v3") \
            and isinstance(args, tuple) and len(args) >= 3 and isinstance(args[0], PersId):
        pid = args[0].value
        if isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[2], str):
            storage_class = pid[1].name.rsplit(".", 1)[-1] if isinstance(pid[1], Global) else ""
            dtype = STORAGE_DTYPES.get(storage_class)
            if storage_class == "UntypedStorage" and len(args) > 3 and isinstance(args[-1], Global):
                dtype = args[-1].name.rsplit(".", 1)[-1]
            shape = args[2] if isinstance(args[2], tuple) and all(isinstance(d, int) for d in args[2]) else ()
            offset = args[1] if isinstance(args[1], int) else 0
            facts.tensors.append(Tensor(pid[2], dtype or "unknown", offset, shape,
                                        pid[4] if isinstance(pid[4], int) else None))
    return call
