"""Reading files written by `torch.save`, with numpy arrays for tensors, without running code from them.

A `torch.save` file is made of pickles, and unpickling calls whatever a pickle
names: a crafted `.pth` runs arbitrary code when it is read with `pickle.load`
(or `torch.load(weights_only=False)`). Every pickle read here goes through
`RestrictedUnpickler`, which

* resolves only the globals on `ALLOWED_GLOBALS` (torch's tensor and parameter
  rebuilders, storage types, dtypes, `torch.Size`, `collections.OrderedDict` and
  data-only builtins) and refuses every other one;
* accepts persistent ids only for tensor storages, and only in the pickle that
  holds the checkpoint's object;
* sets object state only on an `OrderedDict` (torch's `_metadata` attribute).

Both of torch's file formats are read with it:

* the zip format (torch >= 1.6): `<archive>/data.pkl` and one record per
  storage, `<archive>/data/<key>`;
* the legacy format: five pickles in a row (magic number, protocol version,
  sys_info, the object, the list of storage keys), then the raw storages.

Bytes after the pickle of `data.pkl` or after the last storage of a legacy file
(where torch.save writes nothing, so a second pickle could hide there) are
refused as well. Any file that is not such a checkpoint (text, random bytes, a
truncated download, a zip without `data.pkl`, a directory) raises one
`CheckpointReadError` whose one-line message names the file, says what is
wrong and what to pass instead.

`read_torch_file` reads with this reader whether or not PyTorch is installed, so
one allow-list applies to everybody; `backend="torch"` asks for
`torch.load(..., weights_only=True)` instead, with its errors turned into the
same exceptions.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import os
import pickle
import re
import reprlib
import struct
import zipfile
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

__all__ = [
    "WeightImportError",
    "CheckpointReadError",
    "UnsafeCheckpointError",
    "ALLOWED_GLOBALS",
    "RestrictedUnpickler",
    "read_torch_file",
    "torch_to_numpy",
]

HINT = "pass the .pth/.pth.tar file saved by torch.save"
_TRUST = "loading it could run code from the file; if you trust it, load it in PyTorch and re-save the weights with torch.save(model.state_dict(), path)"
_ALLOW_LIST_SUMMARY = "tensor rebuilders, storage types, dtypes, torch.Size, OrderedDict and data-only builtins"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class WeightImportError(ValueError):
    """A weights file cannot be used: unreadable, refused as unsafe, or not fitting the requested model."""


class CheckpointReadError(WeightImportError):
    """The file cannot be read as a checkpoint at all: not one, truncated, corrupt, or refused as unsafe."""


class UnsafeCheckpointError(CheckpointReadError):
    """A pickle in the file asks for something outside the allow-list (a global, a persistent id, object state)."""


class _Refused(Exception):
    """What a pickle asked for and the allow-list refuses; becomes an `UnsafeCheckpointError` naming the file."""


class _Malformed(Exception):
    """The bytes do not follow torch's layout; becomes a `CheckpointReadError` naming the file."""


class _Truncated(_Malformed):
    """The bytes end before torch's layout does (an interrupted download or copy)."""


# --------------------------------------------------------------------------------------
# The allow-list
# --------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
_TORCH_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float64": "float64",
    "double": "float64",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "int16": "int16",
    "short": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
    "complex64": "complex64",
    "complex128": "complex128",
}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands for `torch.FloatStorage` & co.: names the dtype of a storage's persistent id."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _np_dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class _TypeMarker:
    """Stands for `torch.nn.Parameter` / `torch.Tensor`: only an argument of `_rebuild_from_type_v2`, never called."""

    name: str


def _clean(text: str, limit: int = 120) -> str:
    """`text` as one printable line of at most `limit` characters (names and reprs from a file are untrusted)."""
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(obj: Any) -> str:
    return _clean(reprlib.repr(obj))


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise _Malformed(f"a tensor's {what} is {_describe(value)}, not a tuple of integers")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """`torch._utils._rebuild_tensor(_v2)`: a view of the storage, checked to lie inside it."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise _Malformed(f"a tensor is rebuilt from {_describe(storage)}, not from a storage")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if type(storage_offset) is not int:
        raise _Malformed(f"a tensor's storage offset is {_describe(storage_offset)}, not an integer")
    if len(size) != len(stride) or min(size + stride + (storage_offset,)) < 0:
        raise _Malformed(f"a tensor of size {size}, stride {stride} at offset {storage_offset} is not a valid view")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    extent = 1 + sum((s - 1) * st for s, st in zip(size, stride))
    if storage_offset + extent > storage.size:
        raise _Malformed(
            f"a tensor of size {size}, stride {stride} at offset {storage_offset} overruns its storage of {storage.size} elements"
        )
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(st * storage.itemsize for st in stride)
    )


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """`torch._utils._rebuild_parameter(_with_state)`: a parameter is its tensor here."""
    return data


_REBUILDERS = (_rebuild_tensor, _rebuild_parameter)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """`torch._tensor._rebuild_from_type_v2`: calls a tensor rebuilder, and nothing else."""
    if not any(func is f for f in _REBUILDERS) or not isinstance(new_type, _TypeMarker) or not isinstance(args, tuple):
        raise _Refused(
            f"the pickle asks torch._tensor._rebuild_from_type_v2 to call {_describe(func)} as a {_describe(new_type)}, "
            "which is not a tensor rebuilder"
        )
    return func(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode(text, 'latin1')`, how pickle protocol 2 stores bytes; no other codec runs."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(
            f"the pickle asks for _codecs.encode with encoding {_describe(encoding)}, "
            "while pickle stores bytes with 'latin1' only"
        )
    return text.encode("latin1")


def _bytes(*args: Any) -> bytes:
    """`bytes()`, how pickle protocol 2 stores b''."""
    if args:
        raise _Refused(f"the pickle asks for builtins.bytes{_describe(args)}, while pickle only stores bytes() for b''")
    return b""


def _bytearray(*args: Any) -> bytearray:
    """`bytearray(data)`, how pickle protocol 2 stores a bytearray (never `bytearray(n)`)."""
    if len(args) > 1 or (args and not isinstance(args[0], (bytes, bytearray))):
        raise _Refused(f"the pickle asks for builtins.bytearray{_describe(args)}, while pickle only stores bytearray(bytes)")
    return bytearray(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.parameter.Parameter"),
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytes"): _bytes,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    **{("torch", name): _np_dtype(dtype) for name, dtype in _TORCH_DTYPES.items()},
}

ALLOWED_GLOBALS: tuple[str, ...] = tuple(sorted(f"{module}.{name}" for module, name in _ALLOWED))
"""Every global a pickle may name ("module.name"): what `torch.save` writes for tensors, state dicts and plain data."""


class RestrictedUnpickler(pickle._Unpickler):
    """The one unpickler for every pickle this library reads: an allow-list, not a deny-list.

    Built on the pure-Python unpickler because the C one cannot restrict BUILD
    (which calls `__setstate__` or sets attributes) or the copyreg extension
    opcodes (whose cache of earlier look-ups bypasses `find_class`). Refusals
    raise `_Refused`; `read_torch_file` turns them into `UnsafeCheckpointError`.

    Args:
      file: binary file positioned at the pickle.
      persistent_load: called with each persistent id; None refuses them all
        (every pickle of a checkpoint but the one holding its object).
      what: how messages name this pickle ("data.pkl", "the main pickle", ...).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: IO[bytes], *, persistent_load: Callable[[Any], Any] | None = None, what: str = "the pickle") -> None:
        super().__init__(file, encoding="utf-8")
        self._load_persistent = persistent_load
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if self.proto < 3:  # Python 2 names, as pickle maps them (`__builtin__.set`, `commands.Popen`)
            key = _compat_pickle.NAME_MAPPING.get(key, (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if key in _ALLOWED:
            return _ALLOWED[key]
        raise _Refused(
            f"{self.what} asks for {_clean(key[0])}.{_clean(key[1])}, which is not on the allow-list of a "
            f"PyTorch checkpoint ({_ALLOW_LIST_SUMMARY})"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._load_persistent is None:
            raise _Refused(f"{self.what} has a persistent id {_describe(pid)}, which only the pickle of a checkpoint's object may have")
        return self._load_persistent(pid)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is not collections.OrderedDict or not isinstance(state, dict):
            raise _Refused(
                f"{self.what} sets the state of a {_clean(type(inst).__name__)} object, which a PyTorch checkpoint "
                "never does (it only sets attributes of an OrderedDict)"
            )
        # New attributes only (a state dict's `_metadata`): none may shadow a method such as `items`.
        bad = [k for k in state if type(k) is not str or hasattr(collections.OrderedDict, k)]
        if bad:
            raise _Refused(f"{self.what} sets the attributes {_describe(bad)} of an OrderedDict, which would shadow its own")
        inst.__dict__.update(state)

    def _refuse_extension(self) -> None:
        raise _Refused(f"{self.what} uses a copyreg extension code, which a PyTorch checkpoint never does")

    dispatch[pickle.BUILD[0]] = _load_build
    for _opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = _refuse_extension
    del _opcode


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return _clean(text.splitlines()[0], 200) if text else type(e).__name__


def _unpickle(f: IO[bytes], what: str, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """One pickle from `f` with `RestrictedUnpickler`; a failure other than a refusal is `_Malformed`."""
    try:
        return RestrictedUnpickler(f, persistent_load=persistent_load, what=what).load()
    except (_Refused, _Malformed):
        raise
    except EOFError as e:
        raise _Truncated(f"the file ends inside {what}") from e
    except pickle.UnpicklingError as e:
        if "truncated" in str(e):
            raise _Truncated(f"the file ends inside {what}") from e
        raise _Malformed(f"{what} is corrupt ({_first_line(e)})") from e
    except Exception as e:  # any failure to unpickle untrusted bytes: a bad opcode argument, a wrong type, ...
        raise _Malformed(f"{what} is corrupt ({type(e).__name__}: {_first_line(e)})") from e


def _storage_pid(pid: Any, fields: int, what: str) -> tuple[_StorageType, str, int]:
    """Checks a storage's persistent id; returns (storage type, key, number of elements)."""
    kind = pid[0] if isinstance(pid, tuple) and pid else pid
    if isinstance(kind, bytes):
        kind = kind.decode("ascii", "replace")
    if not (isinstance(kind, str) and kind == "storage"):
        raise _Refused(
            f"{what} has a persistent id of kind {_describe(kind)}; a PyTorch checkpoint only has persistent ids of tensor storages"
        )
    if len(pid) != fields:
        raise _Malformed(f"a storage's persistent id has {len(pid)} fields instead of {fields}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, _StorageType):
        raise _Malformed(f"a storage's type is {_describe(storage_type)}, not a torch storage type")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise _Malformed(f"a storage's key {_describe(key)} or size {_describe(numel)} is invalid")
    return storage_type, key, numel


# --------------------------------------------------------------------------------------
# The two formats
# --------------------------------------------------------------------------------------


def _read_zip(f: IO[bytes]) -> Any:
    """Torch's zip format: `<archive>/data.pkl` with one `<archive>/data/<key>` record per storage."""
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as e:
        raise _Malformed(f"truncated or corrupt zip archive (torch's zip format): {_first_line(e)}") from e
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pkls:
            raise _Malformed("a zip archive that has no data.pkl, so not a PyTorch checkpoint")
        if len(pkls) > 1:
            raise _Malformed(f"a zip archive with {len(pkls)} data.pkl records ({_describe(pkls)}); torch.save writes one")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise _Malformed(f"its byteorder record says {_describe(byteorder)}, not 'little' or 'big'")
        storages: dict[str, np.ndarray] = {}

        def load_storage(pid: Any) -> np.ndarray:
            storage_type, key, numel = _storage_pid(pid, 5, "data.pkl")
            if key not in storages:
                dtype = storage_type.dtype
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise _Malformed(f"the archive lacks the record data/{_clean(key)} of a storage")
                need = numel * dtype.itemsize
                if zf.getinfo(name).file_size < need:
                    raise _Truncated(f"storage data/{_clean(key)} holds {zf.getinfo(name).file_size} bytes instead of {need}")
                with zf.open(name) as rec:
                    raw = bytearray(rec.read(need))
                if len(raw) != need:
                    raise _Truncated(f"storage data/{_clean(key)} holds {len(raw)} bytes instead of {need}")
                if byteorder == "big" and dtype.itemsize > 1:
                    storages[key] = np.frombuffer(raw, dtype.newbyteorder(">")).astype(dtype)
                else:
                    storages[key] = np.frombuffer(raw, dtype)
            return storages[key]

        with zf.open(pkls[0]) as rec:
            result = _unpickle(rec, "data.pkl", load_storage)
            rest = len(rec.read())
        if rest:
            raise _Refused(
                f"data.pkl goes on for {rest} bytes after its pickle ends, where torch.save writes nothing (a hidden second pickle?)"
            )
        return result


def _read_legacy(f: IO[bytes], size: int) -> Any:
    """Torch's legacy format: magic number, protocol, sys_info, the object, storage keys, then the storages."""
    try:
        magic = _unpickle(f, "the pickle")
    except _Refused:
        raise
    except _Malformed as e:
        raise _Malformed("not a PyTorch checkpoint (neither torch's zip format nor its legacy format)") from e
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise _Malformed("a pickle, but not a PyTorch checkpoint (it lacks the header torch.save writes)")
    protocol = _unpickle(f, "the protocol-version pickle")
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
        raise _Malformed(f"a legacy PyTorch checkpoint of unknown version {_describe(protocol)} (torch.save writes {_LEGACY_PROTOCOL})")
    sys_info = _unpickle(f, "the sys_info pickle")
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else None
    if type(little) is not bool:
        raise _Malformed(f"its sys_info pickle is {_describe(sys_info)}, not torch's dict with 'little_endian'")

    roots: dict[str, np.ndarray] = {}  # filled in place once the storages are read, after the object's pickle
    views: dict[str, np.ndarray] = {}

    def load_storage(pid: Any) -> np.ndarray:
        storage_type, root_key, numel = _storage_pid(pid, 6, "the main pickle")
        dtype = storage_type.dtype
        if numel * dtype.itemsize > size:
            raise _Truncated(f"storage {_clean(root_key)} needs {numel * dtype.itemsize} bytes but the whole file has {size}")
        if root_key not in roots:
            roots[root_key] = np.empty(numel, dtype)
        root = roots[root_key]
        if root.dtype != dtype or root.size != numel:
            raise _Malformed(f"storage {_clean(root_key)} is used with two types or sizes")
        view_metadata = pid[5]
        if view_metadata is None:
            return root
        if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3 and isinstance(view_metadata[0], str)
                and all(type(v) is int and 0 <= v for v in view_metadata[1:]) and sum(view_metadata[1:]) <= numel):
            raise _Malformed(f"a storage view {_describe(view_metadata)} does not lie inside storage {_clean(root_key)}")
        view_key, offset, view_size = view_metadata
        if view_key not in views:
            views[view_key] = root[offset : offset + view_size]
        return views[view_key]

    result = _unpickle(f, "the main pickle", load_storage)
    keys = _unpickle(f, "the storage-key pickle")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise _Malformed(f"its storage-key pickle is {_describe(keys)}, not a list of distinct storage keys")
    missing = [k for k in roots if k not in keys]
    if missing:
        raise _Malformed(f"storages {_describe(missing)} are used but not stored")
    unused = [k for k in keys if k not in roots]
    if unused:
        raise _Malformed(f"storages {_describe(unused)} are stored but never used")
    order = "<" if little else ">"
    for key in keys:
        root = roots[key]
        head = f.read(8)
        if len(head) != 8:
            raise _Truncated(f"the file ends before storage {_clean(key)}")
        (count,) = struct.unpack(order + "q", head)
        if count != root.size:
            raise _Malformed(f"storage {_clean(key)} holds {count} elements instead of {root.size}")
        raw = f.read(root.nbytes)
        if len(raw) != root.nbytes:
            raise _Truncated(f"the file ends inside storage {_clean(key)} ({len(raw)} of {root.nbytes} bytes)")
        root[...] = np.frombuffer(raw, root.dtype.newbyteorder(order))
    rest = size - f.tell()
    if rest:
        raise _Refused(
            f"the file goes on for {rest} bytes after its last storage, where torch.save writes nothing (a hidden pickle?)"
        )
    return result


def _read_restricted(path: Path, size: int) -> Any:
    try:
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                f.seek(0)
                return _read_zip(f)
            f.seek(0)
            if f.read(4) == b"PK\x03\x04":
                raise _Malformed(
                    "truncated or corrupt zip archive (torch's zip format): its central directory is missing, "
                    "so the file was probably cut short (copy or download it again)"
                )
            f.seek(0)
            return _read_legacy(f, size)
    except _Refused as e:
        raise UnsafeCheckpointError(f"{path}: refused to load: {e}; {_TRUST}") from e
    except _Truncated as e:
        raise CheckpointReadError(f"{path}: truncated: {e}; the file is incomplete, copy or download it again ({HINT})") from e
    except _Malformed as e:
        raise CheckpointReadError(f"{path}: {e}; {HINT}") from e
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot read the file ({_first_line(e)})") from e
    except Exception as e:  # any other failure to parse untrusted bytes means a corrupt file
        raise CheckpointReadError(f"{path}: corrupt PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); {HINT}") from e


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with its errors as this module's."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading PyTorch checkpoints with backend='torch' needs PyTorch: install l2t_jax[torch] "
            "(or use the default backend='auto')"
        ) from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        match = re.search(r"GLOBAL ([\w.]+)", str(e))
        if match:
            module, _, name = match.group(1).rpartition(".")  # torch drops "builtins." and keeps Python 2 names
            module, name = _compat_pickle.NAME_MAPPING.get(
                (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module or "builtins"), name)
            )
            name = f"{module}.{name}"
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the pickle asks for {_clean(name)}, which is not on the "
                f"allow-list of torch.load(weights_only=True); {_TRUST}"
            ) from e
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reasons = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation", "(1)", "(2)"))]
        raise CheckpointReadError(
            f"{path}: torch.load(weights_only=True) cannot read the file ({_clean(reasons[0] if reasons else 'refused', 200)}); {HINT}"
        ) from e
    except Exception as e:  # torch reports corrupt files as RuntimeError, EOFError, ...
        raise CheckpointReadError(f"{path}: torch.load cannot read the file ({type(e).__name__}: {_first_line(e)}); {HINT}") from e
    return torch_to_numpy(obj)


def read_torch_file(path: str | os.PathLike, *, backend: str = "auto") -> Any:
    """Reads a file written by `torch.save`, with every tensor as a numpy array, running no code from it.

    Containers (dict, OrderedDict, list, tuple) come back as such with numpy
    arrays in place of tensors; tensors that shared storage in the file share
    memory here (so aliased parameters can be recognised). Nothing is moved to
    a GPU.

    Args:
      path: the file.
      backend: "auto" or "numpy": this module's restricted reader (whether or
        not PyTorch is installed); "torch": `torch.load(path,
        map_location="cpu", weights_only=True)`, with its errors turned into
        this module's.

    Returns:
      The unpickled object with numpy arrays for tensors.

    Raises:
      FileNotFoundError: `path` does not exist.
      UnsafeCheckpointError: a pickle in the file asks for something outside
        the allow-list (nothing from the file has run).
      CheckpointReadError: the file is not a PyTorch checkpoint (a directory,
        empty, text, truncated, corrupt); the message names the file and says
        what is wrong.
      ImportError: backend "torch" without PyTorch installed.
      ValueError: an unknown backend.
    """
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'numpy' or 'torch'")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointReadError(f"{path} is a directory, not a checkpoint file; {HINT}")
    if not path.is_file():
        raise CheckpointReadError(f"{path} is not a regular file; {HINT}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointReadError(f"{path}: the file is empty (0 bytes), not a PyTorch checkpoint; {HINT}")
    if backend == "torch":
        return _torch_load(path)
    return _read_restricted(path, size)


def _tensor_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def map_containers(fn: Callable[[Any], Any], obj: Any) -> Any:
    """`obj` with `fn` applied to every value inside its dicts, OrderedDicts, lists and tuples.

    The containers are rebuilt with their own types (OrderedDict stays OrderedDict);
    anything else is a leaf.
    """
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, map_containers(fn, v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: map_containers(fn, v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_containers(fn, v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(map_containers(fn, v) for v in obj)
    return fn(obj)


def torch_to_numpy(obj: Any) -> Any:
    """`obj` with every torch tensor replaced by a numpy array (containers rebuilt, other leaves kept).

    Args:
      obj: what `torch.load` returned, or a state dict of tensors (needs torch
        only when `obj` holds tensors).

    Returns:
      The same structure with numpy arrays (sharing memory with the tensors).
    """
    def leaf(x: Any) -> Any:
        if type(x).__module__.startswith("torch"):
            import torch

            if isinstance(x, torch.Tensor):
                return _tensor_to_numpy(x)
        return x

    return map_containers(leaf, obj)
