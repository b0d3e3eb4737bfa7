"""safetensors I/O without a framework: lazy per-tensor reads from one file or shards + index,
streaming writes, layout detection (-PT vs -Paddle) and bf16 kept as raw 16-bit data.

numpy has no bfloat16, so bf16 tensors travel as uint16 arrays holding the raw bits, tagged with
the dtype name "bfloat16"; they are only widened (exactly) when a float32 copy is asked for.
"""

from __future__ import annotations

import json
import mmap
import os
import re
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


def read_header(path: Path) -> tuple[dict, dict]:
    """Parse and validate one safetensors file's header: ({name: TensorInfo}, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ErnieError(f"{path}: truncated safetensors file (no header); re-download or re-convert it")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ErnieError(f"{path}: corrupt safetensors header (length {n}); re-download or re-convert it")
            raw = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ErnieError(f"{path}: corrupt safetensors header (not JSON); re-download or re-convert it") from None
    except OSError as e:
        raise ErnieError(f"{path}: cannot read ({e.strerror})") from None
    metadata = raw.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = {}
    for name, entry in raw.items():
        try:
            code, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ErnieError(f"{path}: corrupt safetensors entry for tensor {name!r}") from None
        if code not in DTYPES:
            raise ErnieError(f"{path}: tensor {name!r} has unsupported dtype {code}")
        dtype = DTYPES[code][0]
        if stop - begin != int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype] or begin < 0:
            raise ErnieError(f"{path}: tensor {name!r} byte range does not match its shape {list(shape)}")
        if base + stop > size:
            raise ErnieError(f"{path}: truncated safetensors file (tensor {name!r} ends past the end of the "
                             f"file, {base + stop} > {size} bytes); re-download or re-convert it")
        tensors[name] = TensorInfo(name, dtype, shape, path, base + begin, base + stop)
    return tensors, metadata


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
            self.tensors.update(tensors)
        if not self.tensors:
            raise ErnieError(f"{self.directory}: the safetensors files hold no tensors")
        for name, shard in self._weight_map.items():
            if name not in self.tensors:
                raise ErnieError(f"{self.index_file}: names tensor {name!r} in {shard}, which does not hold it; "
                                 "download the complete shard set")
        self._maps: dict[Path, mmap.mmap] = {}

    def _weight_files(self) -> list[Path]:
        if self.index_file.is_file():
            try:
                weight_map = json.loads(self.index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ErnieError(f"{self.index_file}: corrupt index (no weight_map)") from None
            files = []
            for shard in dict.fromkeys(weight_map.values()):
                path = self.directory / shard
                if not path.is_file():
                    raise ErnieError(f"{self.index_file}: names shard {shard}, which is missing; "
                                     "download the complete shard set")
                files.append(path)
            self._weight_map = weight_map
            return files
        single = self.directory / SINGLE_FILE
        if single.is_file():
            return [single]
        others = sorted(self.directory.glob("*.safetensors"))
        if others:
            return others
        if any(self.directory.glob("*.pdparams")):
            raise ErnieError(f"{self.directory}: only *.pdparams weights found; convert them first with "
                             "`convert pt2paddle`/`paddle2pt --allow-pickle` or use safetensors weights")
        raise ErnieError(f"{self.directory}: no model.safetensors or {INDEX_FILE} found")

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def layout(self) -> str:
        return detect_layout(self.tensors, self.directory)

    def dtype(self, name: str) -> str:
        dtype = self.tensors[name].dtype
        # Paddle writers store bf16 as U16 raw bits.
        return "bfloat16" if dtype == "uint16" else dtype

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

    def read(self, name: str) -> np.ndarray:
        """The tensor copied into a fresh array. Unlike `get`, nothing stays mapped afterwards, so a pass over
        a whole checkpoint keeps only the tensors in hand resident, not every page it has touched."""
        info = self.tensors[name]
        np_dtype = DTYPES[CODES[info.dtype]][1]
        try:
            with open(info.file, "rb") as f:
                array = np.fromfile(f, dtype=np_dtype, count=info.nbytes // ITEMSIZE[info.dtype], offset=info.start)
        except OSError as e:
            raise ErnieError(f"{info.file}: cannot read tensor {name!r} ({e.strerror})") from None
        if array.nbytes != info.nbytes:
            raise ErnieError(f"{info.file}: truncated while reading tensor {name!r}; re-download or re-convert it")
        return array.reshape(info.shape)

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
