"""Read the tensors of a TorchScript archive (OpenAI's released CLIP ``.pt`` files) without executing it.

OpenAI published CLIP as TorchScript archives. ``torch.jit.load`` compiles and runs the archive's code and
``torch.load(weights_only=True)`` refuses it, so neither is acceptable for an untrusted download. A TorchScript
archive is a zip holding ``<root>/data.pkl`` (a pickle of the module tree whose tensors point, through
persistent ids, at raw storages in ``<root>/data/<key>``) next to the module source in ``<root>/code/``.
This module unpickles ``data.pkl`` with an allow-list: module classes become inert records, tensors are built
from the raw storage bytes, and any other global (``os.system``, ``builtins.eval``...) is refused. The code
files are only scanned as text for their ``__parameters__`` / ``__buffers__`` declarations, which give the
exact ``state_dict()`` names of the original module.
"""

from __future__ import annotations

import ast
import pickle
import re
import zipfile
from collections import OrderedDict
from os import PathLike
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "is_torchscript_archive", "read_torchscript_state_dict"]

# Legacy typed-storage class names written by the TorchScript pickler ("torch FloatStorage", ...).
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}

_CLASS_RE = re.compile(r"^class\s+(\w+)\s*\(")
_DECLARATION_RE = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The archive references something other than tensors and inert module records."""


class ScriptModuleRecord:
    """Inert stand-in for a ``__torch__.*`` class: it only keeps the state pickled for the object."""

    qualified_name = "__torch__"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # never called by NEWOBJ, kept for REDUCE
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    """Marker standing for ``torch.<Name>Storage``; only its dtype is used."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _restore_type_tag(value: Any, type_tag: str) -> Any:
    return value


def _as_list(value: Any) -> list:
    return list(value)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``data.pkl`` that can build tensors and inert records, and nothing else."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str, big_endian: bool) -> None:
        super().__init__(file)
        self._archive = archive
        self._root = root
        self._big_endian = big_endian
        self._storages: dict[str, torch.Tensor] = {}
        self._record_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._record_classes:
                self._record_classes[qualified] = type(
                    name, (ScriptModuleRecord,), {"qualified_name": qualified}
                )
            return self._record_classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("collections", "OrderedDict"): OrderedDict,
            ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
            ("torch.jit._pickle", "build_intlist"): _as_list,
            ("torch.jit._pickle", "build_doublelist"): _as_list,
            ("torch.jit._pickle", "build_boollist"): _as_list,
            ("torch.jit._pickle", "build_tensorlist"): _as_list,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise UnsafeCheckpointError(
            f"Refusing to load the global '{module}.{name}' referenced by the TorchScript archive: only "
            "tensors and module records are read. The file is corrupt or not a model checkpoint."
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"Unexpected persistent id {pid!r} in the TorchScript archive.")
        _, storage_type, key, _location, numel = pid
        if (
            not isinstance(storage_type, _StorageType)
            or not isinstance(key, str)
            or not isinstance(numel, int)
        ):
            raise UnsafeCheckpointError(f"Malformed storage reference {pid!r} in the TorchScript archive.")
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise UnsafeCheckpointError(f"Storage {key} is referenced with two dtypes in the archive.")
        return storage

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{self._root}data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise UnsafeCheckpointError(f"The archive lacks the storage file '{name}'.") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if info.file_size != numel * itemsize:
            raise UnsafeCheckpointError(
                f"Storage '{name}' holds {info.file_size} bytes, expected {numel} x {itemsize} for {dtype}."
            )
        buffer = bytearray(info.file_size)
        with self._archive.open(info) as handle:
            handle.readinto(buffer)
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        flat = torch.frombuffer(buffer, dtype=torch.uint8)
        if self._big_endian and itemsize > 1:
            # Complex numbers are two reals, each stored with its own byte order.
            unit = itemsize // 2 if dtype.is_complex else itemsize
            flat = flat.view(-1, unit).flip(-1).reshape(-1)
        return flat.view(dtype)

    @staticmethod
    def _rebuild_tensor(
        storage: Any, storage_offset: int, size: tuple, stride: tuple, *_: Any
    ) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor):
            raise UnsafeCheckpointError("A tensor in the archive does not point at a storage.")
        needed = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
        if needed > storage.numel():
            raise UnsafeCheckpointError(
                f"A tensor of size {tuple(size)} reads past the end of its storage ({storage.numel()} items)."
            )
        return storage.as_strided(tuple(size), tuple(stride), storage_offset)

    @staticmethod
    def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
        return data


def _find_root(archive: zipfile.ZipFile) -> str:
    roots = [name[: -len("data.pkl")] for name in archive.namelist() if name.endswith("data.pkl")]
    roots = [root for root in roots if root.count("/") <= 1]
    if len(roots) != 1:
        raise ValueError("Not a TorchScript archive: expected exactly one '<root>/data.pkl' entry.")
    return roots[0]


def is_torchscript_archive(path: str | PathLike) -> bool:
    """True for a TorchScript zip (it carries module code), False for plain ``torch.save`` files."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        try:
            root = _find_root(archive)
        except ValueError:
            return False
        names = archive.namelist()
        return f"{root}constants.pkl" in names or any(name.startswith(f"{root}code/") for name in names)


def _read_declarations(archive: zipfile.ZipFile, root: str) -> dict[str, tuple[list[str], list[str]]]:
    """Map each ``__torch__`` class name to its declared parameter and buffer names.

    The code is read as text and only the two list literals are evaluated (``ast.literal_eval``).
    """
    declarations: dict[str, tuple[list[str], list[str]]] = {}
    code_dir = f"{root}code/"
    for name in archive.namelist():
        if not (name.startswith(code_dir) and name.endswith(".py")):
            continue
        module = name[len(code_dir) : -len(".py")].replace("/", ".")
        current = None
        for line in archive.read(name).decode("utf-8", errors="replace").splitlines():
            match = _CLASS_RE.match(line)
            if match:
                current = f"{module}.{match.group(1)}"
                declarations[current] = ([], [])
                continue
            match = _DECLARATION_RE.match(line)
            if match and current is not None:
                names = ast.literal_eval(match.group(2))
                declarations[current][0 if match.group(1) == "__parameters__" else 1].extend(names)
    return declarations


def _flatten(
    record: ScriptModuleRecord,
    prefix: str,
    declarations: dict[str, tuple[list[str], list[str]]],
    out: dict[str, torch.Tensor],
) -> None:
    """Walk the module tree like ``nn.Module.state_dict``: own parameters, own buffers, then children."""
    state = record.state
    if not isinstance(state, dict):
        return  # a script class with custom __getstate__, not a module: holds no state-dict entries
    if record.qualified_name in declarations:
        parameters, buffers = declarations[record.qualified_name]
        names = parameters + buffers
    else:  # no code for this class: every tensor attribute is taken as state
        names = [key for key, value in state.items() if isinstance(value, torch.Tensor)]
    for name in names:
        value = state.get(name)
        if value is None:
            continue  # optional parameter set to None (e.g. a Linear without bias)
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"'{prefix}{name}' is declared as a parameter or buffer but holds {type(value)}."
            )
        out[f"{prefix}{name}"] = value
    for name, value in state.items():
        if isinstance(value, ScriptModuleRecord):
            _flatten(value, f"{prefix}{name}.", declarations, out)


def read_torchscript_state_dict(path: str | PathLike) -> dict[str, torch.Tensor]:
    """Return the ``state_dict()`` of a TorchScript archive as tensors, without executing any of it.

    Names and order match ``torch.jit.load(path).state_dict()``: parameters and buffers with dotted names.
    Tensors keep their stored dtype (OpenAI's archives are mostly float16) and may share memory with each
    other where the archive shares storages. Raises ``UnsafeCheckpointError`` if the pickle references
    anything but tensors and module records.
    """
    with zipfile.ZipFile(path) as archive:
        root = _find_root(archive)
        names = set(archive.namelist())
        byteorder = (
            archive.read(f"{root}byteorder").decode().strip() if f"{root}byteorder" in names else "little"
        )
        if byteorder not in ("little", "big"):
            raise ValueError(f"Unknown byte order '{byteorder}' in {path}.")
        declarations = _read_declarations(archive, root)
        with archive.open(f"{root}data.pkl") as handle:
            tree = _RestrictedUnpickler(handle, archive, root, big_endian=byteorder == "big").load()
    if not isinstance(tree, ScriptModuleRecord):
        raise ValueError(f"{path} does not hold a TorchScript module (its data.pkl root is {type(tree)}).")
    state_dict: dict[str, torch.Tensor] = {}
    _flatten(tree, "", declarations, state_dict)
    return state_dict
