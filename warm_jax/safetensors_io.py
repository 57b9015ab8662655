"""Reading and writing safetensors files with numpy alone (no torch, no `safetensors` package).

The format: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}),
then the tensors' bytes, row-major, little-endian, offsets relative to the end of the
header. Reading maps the file (np.memmap), so a tensor's bytes are read only when (and as
far as) it is sliced; a sharded checkpoint's model.safetensors.index.json maps each name to
its shard.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping, Optional

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A file that is not valid safetensors (the message names the file and field)."""


class SafetensorsFile:
    """One .safetensors file: its header, and tensors as read-only memory-mapped arrays."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise SafetensorsError(f"{self.path}: too short for a safetensors header")
                (n,) = struct.unpack("<Q", raw)
                if n > min(_MAX_HEADER, size - 8):
                    raise SafetensorsError(f"{self.path}: header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: unreadable safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        self.metadata: dict = dict(header.pop("__metadata__", None) or {})
        self._start = 8 + n
        self.size = size  # bytes of the file
        self.header: dict = {}
        for name, info in header.items():
            try:
                dtype, shape, (b, e) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed entry "
                                       f"({err!r})") from err
            if dtype not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                       f"{dtype!r}")
            want = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if e - b != want or b < 0 or self._start + e > size:
                raise SafetensorsError(f"{self.path}: tensor {name!r} data_offsets {[b, e]} do "
                                       f"not fit shape {shape} {dtype} (file of {size} bytes)")
            self.header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [int(b), int(e)]}

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self.header[name]["dtype"]])

    def data_offset(self, name: str) -> int:
        """Where the tensor's bytes start in the file."""
        return self._start + self.header[name]["data_offsets"][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map of its own bytes (nothing read yet; the
        mapping goes away with the last reference, so pages read do not pile up)."""
        info = self.header[name]
        b, e = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        if e == b:
            return np.zeros(info["shape"], dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._start + b,
                         shape=tuple(info["shape"]))

    def close(self) -> None:
        """Nothing to release: every tensor maps (and unmaps) its own bytes."""


class CheckpointFiles:
    """All tensors of an HF checkpoint directory (single file, or shards with an index)."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, INDEX_NAME)
        single = os.path.join(self.directory, SINGLE_NAME)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SafetensorsError(f"{index}: no readable 'weight_map' ({e!r})") from e
            for name, shard in weight_map.items():
                path = os.path.join(self.directory, shard)
                if shard not in self.files:
                    if not os.path.exists(path):
                        raise SafetensorsError(f"{index}: field 'weight_map' names shard "
                                               f"{shard!r}, which does not exist")
                    self.files[shard] = SafetensorsFile(path)
                if name not in self.files[shard].header:
                    raise SafetensorsError(f"{path}: lacks tensor {name!r} that {index} "
                                           "maps to it")
                self.where[name] = shard
        elif os.path.exists(single):
            self.files[SINGLE_NAME] = SafetensorsFile(single)
            self.where = {n: SINGLE_NAME for n in self.files[SINGLE_NAME].header}
        else:
            raise SafetensorsError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME} "
                                   "(only safetensors checkpoints are read)")

    def keys(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> SafetensorsFile:
        return self.files[self.where[name]]

    def shape(self, name: str) -> tuple:
        return self.file_of(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.file_of(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self.file_of(name).get(name)

    def path_of(self, name: str) -> str:
        return self.file_of(name).path

    @property
    def metadata(self) -> dict:
        out: dict = {}
        for f in self.files.values():
            out.update(f.metadata)
        return out

    def nbytes(self) -> int:
        return sum(int(np.prod(self.shape(n), dtype=np.int64)) * self.dtype(n).itemsize
                   for n in self.where)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def write_file(path: str, tensors: Iterable[tuple[str, np.ndarray]],
               metadata: Optional[Mapping[str, str]] = None) -> int:
    """Writes (name, array) pairs to `path`; returns the bytes of tensor data written.

    An array may be a `Lazy` (shape and dtype known up front, data made on demand): each is
    called once, in order, while writing, so only one tensor is held at a time.
    """
    items = list(tensors)
    header: dict = {}
    offset = 0
    specs = []
    for name, arr in items:
        shape, dtype = (arr.shape, arr.dtype) if not callable(arr) else arr.spec
        dtype = np.dtype(dtype)
        if dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + n]}
        specs.append((name, arr, tuple(shape), dtype))
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, arr, shape, dtype in specs:
            a = arr() if callable(arr) else arr
            a = np.ascontiguousarray(a)
            if a.shape != shape or a.dtype != dtype:
                raise SafetensorsError(f"{path}: tensor {name!r} is {a.shape} {a.dtype}, "
                                       f"announced {shape} {dtype}")
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
            del a
    return offset


class Lazy:
    """A tensor produced on demand while writing: Lazy(shape, dtype, fn)."""

    def __init__(self, shape, dtype, fn):
        self.spec = (tuple(shape), np.dtype(dtype))
        self._fn = fn

    def __call__(self) -> np.ndarray:
        return self._fn()
