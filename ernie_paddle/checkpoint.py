"""safetensors I/O without a framework: lazy per-tensor reads from one file or shards + index,
streaming writes, layout detection (-PT vs -Paddle) and bf16 kept as raw 16-bit data.

numpy has no bfloat16, so bf16 tensors travel as uint16 arrays holding the raw bits, tagged with
the dtype name "bfloat16"; they are only widened (exactly) when a float32 copy is asked for.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ErnieError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype code -> (our dtype name, numpy storage dtype)
DTYPES = {
    "F64": ("float64", np.float64), "F32": ("float32", np.float32), "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16), "I64": ("int64", np.int64), "I32": ("int32", np.int32),
    "I16": ("int16", np.int16), "I8": ("int8", np.int8), "U8": ("uint8", np.uint8),
    "U16": ("uint16", np.uint16), "U32": ("uint32", np.uint32), "U64": ("uint64", np.uint64),
    "BOOL": ("bool", np.bool_),
}
CODES = {name: code for code, (name, _) in DTYPES.items()}
ITEMSIZE = {name: np.dtype(np_dtype).itemsize for name, np_dtype in DTYPES.values()}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
COMPARE_BLOCK_BYTES = 4 << 20  # bytes of each tensor read at a time by same_values
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # our name: "bfloat16", "float32", ...
    shape: tuple
    file: Path
    start: int          # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def read_header(path: Path) -> tuple[dict, dict]:
    """Parse and validate one safetensors file's header as the safetensors library does: a JSON object of
    entries whose byte ranges, in order, tile the data exactly (no gap, no overlap, nothing after the last),
    each as long as its dtype and shape say. Returns ({name: TensorInfo}, metadata)."""
    try:
        with open_regular_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ErnieError(f"{path}: truncated safetensors file (no header); re-download or re-convert it")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ErnieError(f"{path}: corrupt safetensors header (length {n}); re-download or re-convert it")
            text = f.read(n).decode("utf-8")
    except UnicodeDecodeError:
        raise ErnieError(f"{path}: corrupt safetensors header (not UTF-8); re-download or re-convert it") from None
    except OSError as e:
        raise ErnieError(f"{path}: cannot read ({e.strerror})") from None
    raw = parse_header_json(path, text)
    metadata = raw.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ErnieError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings); "
                         "re-download or re-convert it")
    base = 8 + n
    tensors = {name: tensor_info(path, name, entry, base) for name, entry in raw.items()}
    end = base
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != end:
            what = "overlaps the tensor before it" if info.start < end else "leaves a gap before it"
            raise ErnieError(f"{path}: corrupt safetensors header (tensor {info.name!r} {what}: data_offsets "
                             f"[{info.start - base}, {info.end - base}]); re-download or re-convert it")
        end = info.end
    if end > size:
        name = max(tensors.values(), key=lambda t: t.end).name
        raise ErnieError(f"{path}: truncated safetensors file (tensor {name!r} ends past the end of the "
                         f"file, {end} > {size} bytes); re-download or re-convert it")
    if end < size:
        raise ErnieError(f"{path}: corrupt safetensors file ({size - end} bytes after the last tensor); "
                         "re-download or re-convert it")
    return tensors, metadata


def open_regular_file(path: Path):
    """`path` opened for binary reading, refused unless it is a regular file: opening a FIFO would block."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ErnieError(f"{path}: not a regular file; replace it with the real file")
    return os.fdopen(fd, "rb")


def parse_header_json(path: Path, text: str) -> dict:
    """The header's JSON object, with the safetensors library's strictness where Python's json module is
    lenient: no duplicate keys, no NaN or Infinity, "-0" is a float, strings are valid Unicode."""
    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key")
        return dict(pairs)

    def refuse(constant):
        raise ValueError(constant)

    try:
        raw = json.loads(text, object_pairs_hook=unique, parse_constant=refuse,
                         parse_int=lambda s: -0.0 if s == "-0" else int(s))
        json.dumps(raw, ensure_ascii=False).encode("utf-8")  # lone surrogates, which JSON escapes can make
    except (ValueError, RecursionError, UnicodeEncodeError):  # JSONDecodeError is a ValueError
        raise ErnieError(f"{path}: corrupt safetensors header (not JSON); re-download or re-convert it") from None
    if not isinstance(raw, dict):
        raise ErnieError(f"{path}: corrupt safetensors header (not a JSON object); re-download or re-convert it")
    return raw


def is_size(value) -> bool:
    """A JSON integer the safetensors library reads as a size (u64): not a float, not a bool."""
    return type(value) is int and 0 <= value < 1 << 64


def tensor_info(path: Path, name: str, entry, base: int) -> TensorInfo:
    if not isinstance(entry, dict) or entry.keys() != ENTRY_KEYS:
        raise ErnieError(f"{path}: corrupt safetensors entry for tensor {name!r} (expected exactly the keys "
                         "dtype, shape, data_offsets); re-download or re-convert it")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise ErnieError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(is_size(d) for d in shape):
        raise ErnieError(f"{path}: corrupt safetensors entry for tensor {name!r} (shape {shape} is not a list of "
                         "non-negative integers); re-download or re-convert it")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_size(o) for o in offsets):
        raise ErnieError(f"{path}: corrupt safetensors entry for tensor {name!r} (data_offsets {offsets} is not "
                         "a pair of non-negative integers); re-download or re-convert it")
    dtype = DTYPES[code][0]
    begin, stop = offsets
    if stop - begin != math.prod(shape) * ITEMSIZE[dtype]:
        raise ErnieError(f"{path}: tensor {name!r} byte range {offsets} does not match its shape {shape}; "
                         "re-download or re-convert it")
    return TensorInfo(name, dtype, tuple(shape), path, base + begin, base + stop)


class Checkpoint:
    """The tensors of a model directory, read lazily (memory-mapped, one tensor at a time)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ErnieError(f"{self.directory}: no such model directory")
        self.index_file = self.directory / INDEX_FILE
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self._weight_map: dict[str, str] = {}
        for file in self._weight_files():
            tensors, metadata = read_header(file)
            self.metadata = self.metadata or metadata
            twice = next((n for n in tensors if n in self.tensors), None)
            if twice:
                raise ErnieError(f"{file}: tensor {twice!r} is also in {self.tensors[twice].file.name}; "
                                 "the shards overlap: download the complete, consistent shard set")
            self.tensors.update(tensors)
        if not self.tensors:
            raise ErnieError(f"{self.directory}: the safetensors files hold no tensors")
        for name, shard in self._weight_map.items():
            if name not in self.tensors or self.tensors[name].file.name != shard:
                raise ErnieError(f"{self.index_file}: names tensor {name!r} in {shard}, which does not hold it; "
                                 "download the complete shard set")
        self._maps: dict[Path, mmap.mmap] = {}

    def _weight_files(self) -> list[Path]:
        if self.index_file.is_file():
            return self._indexed_files()
        single = self.directory / SINGLE_FILE
        if os.path.lexists(single):
            return [single]
        others = sorted(self.directory.glob("*.safetensors"))
        if others:
            return others
        if any(self.directory.glob("*.pdparams")):
            raise ErnieError(f"{self.directory}: only *.pdparams weights found; convert them first with "
                             "`convert pt2paddle`/`paddle2pt --allow-pickle` or use safetensors weights")
        raise ErnieError(f"{self.directory}: no model.safetensors or {INDEX_FILE} found")

    def _indexed_files(self) -> list[Path]:
        """The shards the index names: plain file names in this directory (a symlink there, as the hub cache
        makes, is followed; a path that leads elsewhere is refused before anything is opened)."""
        try:
            weight_map = json.loads(self.index_file.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, IndexError):  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise ErnieError(f"{self.index_file}: corrupt index (no weight_map); re-download it") from None
        except OSError as e:
            raise ErnieError(f"{self.index_file}: cannot read ({e.strerror})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise ErnieError(f"{self.index_file}: corrupt index (weight_map must map tensor names to shard file "
                             "names); re-download it")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            if shard in ("", ".", "..") or "/" in shard or not shard.isprintable():
                raise ErnieError(f"{self.index_file}: names shard {shard!r}, which is not a plain file name in "
                                 f"{self.directory}; an index may only name files beside it")
            path = self.directory / shard
            if not path.exists():
                raise ErnieError(f"{self.index_file}: names shard {shard}, which is missing; "
                                 "download the complete shard set")
            files.append(path)
        self._weight_map = weight_map
        return files

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def layout(self) -> str:
        return detect_layout(self.tensors, self.directory)

    def dtype(self, name: str) -> str:
        """The float dtype weight `name` is stored in; any other is refused, naming the file and tensor."""
        info = self.tensors[name]
        dtype = "bfloat16" if info.dtype == "uint16" else info.dtype  # Paddle writers store bf16 as U16 raw bits
        if dtype not in FLOAT_DTYPES:
            raise ErnieError(f"{info.file}: tensor {name!r} is stored as {dtype}, but a weight must be "
                             f"{', '.join(FLOAT_DTYPES)}; re-convert it from the original checkpoint")
        return dtype

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only array backed by the file (bf16 as uint16 bits)."""
        info = self.tensors[name]
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        np_dtype = DTYPES[CODES[info.dtype]][1]
        return np.frombuffer(mm, dtype=np_dtype, count=info.nbytes // ITEMSIZE[info.dtype],
                             offset=info.start).reshape(info.shape)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or its rows `rows` = (first, end) along the first axis, copied into a fresh array.
        Unlike `get`, nothing stays mapped afterwards, so a pass over a whole checkpoint keeps only the
        tensors in hand resident, not every page it has touched."""
        info = self.tensors[name]
        np_dtype = DTYPES[CODES[info.dtype]][1]
        shape, offset = info.shape, info.start
        if rows is not None:
            first, end = rows[0], min(rows[1], shape[0])
            row_bytes = math.prod(shape[1:]) * ITEMSIZE[info.dtype]
            shape, offset = (end - first, *shape[1:]), offset + first * row_bytes
        count = math.prod(shape)
        try:
            with open(info.file, "rb") as f:
                array = np.fromfile(f, dtype=np_dtype, count=count, offset=offset)
        except OSError as e:
            raise ErnieError(f"{info.file}: cannot read tensor {name!r} ({e.strerror})") from None
        if array.size != count:
            raise ErnieError(f"{info.file}: truncated while reading tensor {name!r}; re-download or re-convert it")
        return array.reshape(shape)

    def close(self):
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()


def detect_layout(names, where="") -> str:
    """'paddle' for `ernie.*` / fused names, 'pt' for `model.*` / split names."""
    paddle = any(n.startswith("ernie.") or ".qkv_proj." in n or ".up_gate_proj." in n for n in names)
    pt = any(n.startswith("model.") or ".q_proj." in n or ".gate_proj." in n for n in names)
    if paddle == pt:
        raise ErnieError(f"{where}: cannot tell the checkpoint layout from its tensor names "
                         "(expected `ernie.*` for -Paddle or `model.*` for -PT)")
    return "paddle" if paddle else "pt"


def same_values(source, a: str, b: str) -> bool:
    """Whether tensors `a` and `b` of `source` (a Checkpoint, or anything with its `tensors`, `dtype` and
    `read`) hold the same values bit for bit, each widened exactly to float32 where their dtypes differ;
    compared a block of rows at a time, so that a large embedding is never in memory twice."""
    info_a, info_b = source.tensors[a], source.tensors[b]
    if info_a.shape != info_b.shape:
        return False
    dtype_a, dtype_b = source.dtype(a), source.dtype(b)
    wide = dtype_a != dtype_b
    rows = info_a.shape[0] if info_a.shape else 0
    per_block = max(1, COMPARE_BLOCK_BYTES * max(1, rows) // max(1, info_a.nbytes))
    for block in [(first, first + per_block) for first in range(0, rows, per_block)] or [None]:
        x, y = source.read(a, block), source.read(b, block)
        if wide:
            x, y = to_float32(x, dtype_a), to_float32(y, dtype_b)
        if not np.array_equal(x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}")):  # bits: NaN == NaN, -0 != 0
            return False
    return True


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Exact widening to float32 (bf16 bits shift into the high half of a float32)."""
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def cast(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert between float dtypes; bf16 rounding is round-to-nearest-even, as torch does."""
    if src == dst:
        return array
    if src not in FLOAT_DTYPES or dst not in FLOAT_DTYPES:
        raise ErnieError(f"cannot cast a {src} tensor to {dst}")
    wide = to_float32(array, src)
    if dst == "float32":
        return wide
    if dst == "float16":
        return wide.astype(np.float16)
    bits = wide.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(wide)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def write_safetensors(path: Path, entries, metadata: dict | None = None, on_bytes=None):
    """Stream tensors to one safetensors file. `entries` is a list of (name, dtype, shape, produce):
    the header is written from shapes alone, then each `produce()` is called in order and its
    array written, so only one tensor is in memory at a time."""
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, produce in entries:
            array = np.ascontiguousarray(produce())
            if tuple(array.shape) != tuple(shape) or array.dtype.itemsize != ITEMSIZE[dtype]:
                raise ErnieError(f"internal: tensor {name} came out as {array.dtype}{list(array.shape)}, "
                                 f"expected {dtype}{list(shape)}")
            f.write(memoryview(array).cast("B"))
            if on_bytes:
                on_bytes(array.nbytes)
            del array  # before the next produce(): only one tensor in memory at a time
        f.flush()
        os.fsync(f.fileno())


def resolve_model_dir(path_or_id: str) -> Path:
    """A local model directory as is; otherwise a hub id ("org/name"), fetched with huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ErnieError(f"{path}: not a directory; expected a model directory")
        return path
    if not HUB_ID.fullmatch(path_or_id):
        raise ErnieError(f"{path}: no such model directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ErnieError(f"{path_or_id}: no such local directory, and huggingface_hub is not installed to fetch "
                         "it as a hub id; pass a local model directory") from None
    try:
        return Path(snapshot_download(path_or_id))
    except Exception as e:  # offline, unknown repo, gated repo: all mean "use a local directory"
        lines = str(e).strip().splitlines()
        reason = re.split(r"(?<=\.)\s", lines[0], maxsplit=1)[0] if lines else type(e).__name__
        raise ErnieError(f"{path_or_id}: no such local directory, and the hub id cannot be fetched ({reason}); "
                         "pass a local model directory") from None
