"""Row-chunked reads of safetensors files with plain file reads, no memory map.

Why not `safe_open`: it memory-maps the file, and every page a conversion touches stays mapped, and so counted in the
process's resident set, until the handle is dropped. Walking a 16 GB Llama through one map makes the converter *look*
as large as the model (and on a device with little RAM, makes the kernel juggle those pages). Reading the byte range of
a few rows at a time into a reused numpy buffer keeps what the process holds to the rows it is working on.

The format is simple enough to read directly: an 8-byte little-endian header length, a JSON header mapping each tensor
to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the header), then the data. Sharded
checkpoints (`model.safetensors.index.json`) are a set of such files with a key -> file map.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import CheckpointError

#: safetensors float dtype -> numpy dtype to read the raw bytes as
_RAW_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 by shifting into the high half (exact)
}
#: Bytes per element of every safetensors dtype (other tensors may share the file; only floats are read).
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}

#: Rows read at once are sized to about this many bytes of float32 (the caller may ask for less).
DEFAULT_CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elems(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def _entries(path: Path) -> dict[str, TensorEntry]:
    header, data_start = _read_header(path)
    size = path.stat().st_size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry") from None
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name} has unknown dtype {dtype}")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes of data for shape {shape} {dtype}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name} lies past the end of the file (the file is truncated)")
        out[name] = TensorEntry(name, path, dtype, shape, data_start + begin, end - begin)
    return out


class StreamingSafetensors:
    """The tensors of one safetensors file, a sharded set (`<stem>.safetensors.index.json`), or an explicit list of
    files, read in row chunks as float32."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._entries: dict[str, TensorEntry] = {}
        for f in self.files:
            if not f.is_file():
                raise CheckpointError(f"{f}: safetensors file not found")
            for name, entry in _entries(f).items():
                if name in self._entries:
                    raise CheckpointError(f"{f}: tensor {name} is also in {self._entries[name].path}")
                self._entries[name] = entry

    @classmethod
    def from_directory(cls, directory: Path, stem: str = "model") -> StreamingSafetensors:
        directory = Path(directory)
        single = directory / f"{stem}.safetensors"
        index = directory / f"{stem}.safetensors.index.json"
        if single.is_file():
            return cls([single])
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
            shards = sorted({directory / f for f in weight_map.values()})
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
            st = cls(shards)
            missing = sorted(k for k in weight_map if k not in st._entries)
            if missing:
                raise CheckpointError(f"{index}: tensor {missing[0]} is listed but not in its shard "
                                      f"{weight_map[missing[0]]}")
            return st
        raise CheckpointError(f"{directory}: no {stem}.safetensors (or {stem}.safetensors.index.json) found")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            where = self.files[0].parent if self.files else "?"
            raise CheckpointError(f"{where}: tensor {name} not found") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32, shape (stop - start, *shape[1:])."""
        e = self.entry(name)
        if e.dtype not in _RAW_DTYPES:
            raise CheckpointError(f"{e.path}: tensor {name} has dtype {e.dtype}; expected one of "
                                  f"{', '.join(_RAW_DTYPES)}")
        raw = _RAW_DTYPES[e.dtype]
        n = (stop - start) * e.row_elems
        buf = np.empty(n, dtype=raw)
        view = memoryview(buf).cast("B")
        offset = e.offset + start * e.row_elems * raw.itemsize
        try:
            fd = os.open(e.path, os.O_RDONLY)
            try:
                got = 0
                while got < len(view):
                    k = os.preadv(fd, [view[got:]], offset + got)
                    if k <= 0:
                        raise CheckpointError(f"{e.path}: tensor {name} is cut short (the file is truncated)")
                    got += k
            finally:
                os.close(fd)
        except OSError as err:
            raise CheckpointError(f"{e.path}: tensor {name} unreadable ({err.strerror or err})") from None
        if e.dtype == "BF16":
            out = (buf.astype(np.uint32) << 16).view(np.float32)
        else:
            out = buf.astype(np.float32, copy=False)
        return out.reshape((stop - start,) + e.shape[1:]) if e.shape else out.reshape(())

    def read(self, name: str) -> np.ndarray:
        """A whole tensor as float32."""
        e = self.entry(name)
        if not e.shape:
            return self.read_rows(name, 0, 1).reshape(())
        return self.read_rows(name, 0, e.rows)

    def iter_rows(self, name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The tensor in consecutive row chunks of about `chunk_bytes` of float32 each."""
        e = self.entry(name)
        if not e.shape:
            yield self.read(name)
            return
        step = max(1, chunk_bytes // max(1, 4 * e.row_elems))
        for start in range(0, e.rows, step):
            yield self.read_rows(name, start, min(e.rows, start + step))
