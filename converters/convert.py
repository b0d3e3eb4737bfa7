"""Streaming conversion between the -PT and -Paddle layouts, and `verify`.

Each output tensor is built on demand from the source tensors it needs, read into memory (not mapped),
written, and dropped: peak memory is about one fused group, whatever the size of the model. Output goes
to a hidden sibling of DST, renamed into place only once everything is written, so a failed run leaves
nothing behind.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import pickle
import secrets
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ernie_paddle.checkpoint import (FLOAT_DTYPES, INDEX_FILE, ITEMSIZE, Checkpoint, TensorInfo, cast,
                                     detect_layout, resolve_model_dir, shard_names, write_safetensors)
from ernie_paddle.config import ErnieConfig, read_json
from ernie_paddle.errors import ErnieError

from .mapping import ROUTER, checked_plan, expected_paddle_shape, paddle_shape, pt_shapes, to_paddle, to_pt

PT, PADDLE = "pt", "paddle"
LAYOUT_NAME = {PT: "-PT", PADDLE: "-Paddle"}
COMMAND_TO = {PADDLE: "pt2paddle", PT: "paddle2pt"}
METADATA = {PT: {"format": "pt"}, PADDLE: {"format": "np"}}
# transformers loads ERNIE's SentencePiece model as a Llama tokenizer (the official Paddle->PT tool sets
# this); Paddle stacks register the ERNIE class under this name (inferred from ERNIEKit's tools).
TOKENIZER_CLASS = {PT: "LlamaTokenizer", PADDLE: "Ernie4_5_Tokenizer"}
# What a model directory needs besides config.json and the weights, copied when SRC has it; nothing else
# is (no sub-directories, no remote code, no stray files).
MODEL_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
               "LICENSE", "LICENSE.txt", "NOTICE", "README.md")
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>


@dataclass
class Tensor:
    """One output tensor, built only when `produce()` is called: `build()` maps the source data, in
    `source_dtype`, which `produce()` then casts to `dtype`."""
    name: str
    dtype: str
    shape: tuple
    build: Callable[[], np.ndarray]
    source_dtype: str
    source_file: Path

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]

    def produce(self) -> np.ndarray:
        return cast(self.build(), self.source_dtype, self.dtype)


@dataclass
class Result:
    dst: Path
    tensors: int
    nbytes: int
    seconds: float
    skipped: list[str] = field(default_factory=list)


@dataclass
class Verification:
    tensors: int
    difference: str | None  # the first difference, or None when A and B hold the same tensors
    skipped: list[str] = field(default_factory=list)


def pt2paddle(src, dst, **options) -> Result:
    """Convert a -PT (transformers) model directory or hub id to the -Paddle layout in `dst`."""
    return convert(src, dst, PADDLE, **options)


def paddle2pt(src, dst, **options) -> Result:
    """Convert a -Paddle (ERNIEKit / FastDeploy) model directory or hub id to the -PT layout in `dst`."""
    return convert(src, dst, PT, **options)


def convert(src, dst, target: str, dtype: str = "auto", overwrite: bool = False, max_shard_size: int | None = None,
            allow_pickle: bool = False, progress: bool = True) -> Result:
    start = time.perf_counter()
    src, dst = resolve_model_dir(str(src)), Path(dst)
    if dtype != "auto" and dtype not in FLOAT_DTYPES:
        raise ErnieError(f"--dtype {dtype}: expected auto, {', '.join(FLOAT_DTYPES)}")
    if dst.resolve() == src.resolve():
        raise ErnieError(f"{dst}: DST would replace SRC {src}; choose another DST")
    if dst.resolve() in src.resolve().parents:  # replacing DST would delete SRC with it
        raise ErnieError(f"{dst}: DST holds SRC {src}; choose a DST outside it, e.g. {src}-converted")
    if src.resolve() in dst.resolve().parents:
        raise ErnieError(f"{dst}: DST is inside SRC {src}; choose a DST outside the source model directory")
    recover_overwritten(dst)
    if dst.exists() and not overwrite:
        raise ErnieError(f"{dst}: already exists; pass --overwrite to replace it")
    config = ErnieConfig.from_dir(src)
    source = open_checkpoint(src, allow_pickle)
    layout = detect_layout(source.names, src)
    if layout == target:
        raise ErnieError(f"{src}: is already in the {LAYOUT_NAME[target]} layout, but `convert {COMMAND_TO[target]}` "
                         f"expects {LAYOUT_NAME[other(target)]} input; to get {LAYOUT_NAME[other(target)]} from it "
                         f"use `convert {COMMAND_TO[other(target)]}`")
    tensors, skipped = target_tensors(source, config, target, dtype, src)
    shards = split_into_shards(tensors, max_shard_size)
    total = sum(t.nbytes for t in tensors)
    try:
        with staged(dst) as out, progress_bar(total, f"{COMMAND_TO[target]} {dst.name}", progress) as bar:
            write_weights(out, shards, METADATA[target], bar.update)
            write_config(out, config, target, None if dtype == "auto" else dtype)
            copy_other_files(src, out, target)
    finally:
        source.close()
    return Result(dst, len(tensors), total, time.perf_counter() - start, skipped)


def verify(a, b, allow_pickle: bool = False, progress: bool = True) -> Verification:
    """Whether A and B, each in either layout, hold the same tensors bit for bit once mapped to A's layout."""
    a, b = resolve_model_dir(str(a)), resolve_model_dir(str(b))
    source_a, source_b = open_checkpoint(a, allow_pickle), open_checkpoint(b, allow_pickle)
    try:
        layout = detect_layout(source_a.names, a)
        tensors_a, skipped = target_tensors(source_a, ErnieConfig.from_dir(a), layout, "auto", a)
        tensors_b, _ = target_tensors(source_b, ErnieConfig.from_dir(b), layout, "auto", b)
        by_name = {t.name: t for t in tensors_b}
        names_a = [t.name for t in tensors_a]
        missing = next((n for n in names_a if n not in by_name), None)
        if missing:
            return Verification(len(tensors_a), f"tensor {missing!r} is in {a} but not in {b}", skipped)
        extra = next((n for n in by_name.keys() - set(names_a)), None)
        if extra:
            return Verification(len(tensors_a), f"tensor {extra!r} is in {b} but not in {a}", skipped)
        with progress_bar(sum(t.nbytes for t in tensors_a), "verify", progress) as bar:
            for ta in tensors_a:
                difference = compare(ta, by_name[ta.name])
                if difference:
                    return Verification(len(tensors_a), difference, skipped)
                bar.update(ta.nbytes)
        return Verification(len(tensors_a), None, skipped)
    finally:
        source_a.close()
        source_b.close()


def other(layout: str) -> str:
    return PT if layout == PADDLE else PADDLE


def compare(a: Tensor, b: Tensor) -> str | None:
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return f"tensor {a.name!r} is {a.dtype}{list(a.shape)} in A but {b.dtype}{list(b.shape)} in B"
    x, y = a.produce(), b.produce()
    bits = f"u{x.dtype.itemsize}"  # compare bits: NaN == NaN, -0.0 != 0.0
    differs = x.view(bits) != y.view(bits)
    if not differs.any():
        return None
    where = np.unravel_index(int(np.argmax(differs)), differs.shape)
    values = [cast(v[where].reshape(1), a.dtype, "float32")[0] for v in (x, y)]
    return (f"tensor {a.name!r} differs in {int(differs.sum())} of {differs.size} elements; "
            f"first at index {list(map(int, where))}: {values[0]} in A vs {values[1]} in B")


def target_tensors(source, config: ErnieConfig, target: str, dtype: str, where) -> tuple[list[Tensor], list[str]]:
    """The tensors of `source` in the `target` layout (cast to `dtype` unless "auto"), in source file order,
    each produced lazily; and the names of source tensors the target has no place for."""
    layout = detect_layout(source.names, where)
    groups, skipped = checked_plan(source, config, layout, where)
    reader = LastRead(source)
    tensors = []
    for group in groups:
        inputs = group.pt if layout == PT else (group.paddle,)
        check_shapes(source, group, inputs, config, layout)
        src_dtype = common_dtype(source, inputs)
        out_dtype = output_dtype(group.paddle, src_dtype, dtype)
        file = source.tensors[inputs[0]].file
        if layout == target:
            tensors += [Tensor(n, out_dtype, source.tensors[n].shape, lambda n=n: reader.read(n), src_dtype, file)
                        for n in inputs]
        elif target == PADDLE:
            shape = paddle_shape(group, [source.tensors[n].shape for n in inputs])
            tensors.append(Tensor(group.paddle, out_dtype, shape,
                                  lambda g=group: to_paddle(g, [reader.read(n) for n in g.pt]), src_dtype, file))
        else:
            shapes = pt_shapes(group, source.tensors[group.paddle].shape, config)
            tensors += [Tensor(name, out_dtype, shape, lambda g=group, k=k: to_pt(g, reader.read(g.paddle), config)[k],
                               src_dtype, file)
                        for k, (name, shape) in enumerate(zip(group.pt, shapes))]
    return tensors, skipped


def check_shapes(source, group, inputs, config: ErnieConfig, layout: str):
    expected = expected_paddle_shape(group.paddle, config)
    if expected is None:
        return
    wanted = [expected] if layout == PADDLE else pt_shapes(group, expected, config)
    for name, shape in zip(inputs, wanted):
        info = source.tensors[name]
        if tuple(info.shape) != tuple(shape):
            raise ErnieError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but config.json implies "
                             f"{list(shape)}; the weights and config.json belong to different models")


def common_dtype(source, names) -> str:
    dtypes = {source.dtype(n) for n in names}
    if len(dtypes) > 1:
        raise ErnieError(f"{source.tensors[names[0]].file}: tensors {', '.join(names)} must share one dtype to be "
                         f"fused, but are {', '.join(source.dtype(n) for n in names)}")
    return dtypes.pop()


def output_dtype(paddle_name: str, src_dtype: str, requested: str) -> str:
    if requested == "auto":
        return src_dtype
    return "float32" if ROUTER.search(paddle_name) else requested


class LastRead:
    """Keeps the last tensor read, so the parts of one fused -Paddle tensor come from a single read."""

    def __init__(self, source):
        self.source, self.name, self.array = source, None, None

    def read(self, name: str) -> np.ndarray:
        if name != self.name:
            self.name, self.array = None, None  # drop the old array before reading the next
            self.array, self.name = self.source.read(name), name
        return self.array


def split_into_shards(tensors: list[Tensor], max_shard_size: int | None) -> list[list[Tensor]]:
    """Like the input (one output shard per source shard), or packed in order up to `max_shard_size` bytes."""
    if max_shard_size is None:
        by_file: dict[Path, list[Tensor]] = {}
        for t in tensors:
            by_file.setdefault(t.source_file, []).append(t)
        return list(by_file.values())
    shards, size = [[]], 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_weights(out: Path, shards: list[list[Tensor]], metadata: dict, on_bytes):
    files = shard_names(len(shards))
    weight_map = {}
    for file, shard in zip(files, shards):
        write_safetensors(out / file, [(t.name, t.dtype, t.shape, t.produce) for t in shard], metadata, on_bytes)
        weight_map.update({t.name: file for t in shard})
    if len(files) > 1:
        total = sum(t.nbytes for shard in shards for t in shard)
        write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_config(out: Path, config: ErnieConfig, target: str, dtype: str | None):
    write_json(out / "config.json", config.to_paddle_dict(dtype) if target == PADDLE else config.to_pt_dict(dtype))


def copy_other_files(src: Path, out: Path, target: str):
    """The files of MODEL_FILES that SRC has, copied; tokenizer_config.json adapted to the target."""
    for name in MODEL_FILES:
        item = src / name
        if not item.exists():
            continue
        if not item.is_file():
            raise ErnieError(f"{item}: not a regular file; replace it with the real file or remove it")
        if name == "tokenizer_config.json":
            tokenizer_config = read_json(item)
            tokenizer_config["tokenizer_class"] = TOKENIZER_CLASS[target]
            tokenizer_config.pop("auto_map", None)  # names remote tokenizer code, which is not copied
            write_json(out / name, tokenizer_config)
        else:
            shutil.copy2(item, out / name)


def write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def staged(dst: Path, option: str = "DST"):
    """A hidden temporary sibling of `dst`, put in place of `dst` when the block succeeds and removed, with
    any parent directories made for it, when it fails. SIGINT and SIGTERM wait out the swap and the
    clean-up, so neither is cut in half. Errors name `dst` as the user gave it: `option`."""
    made = [p for p in reversed(dst.parents) if not p.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = hidden_sibling(dst, "partial")
    except OSError as e:
        raise ErnieError(f"{dst}: cannot create it ({e.strerror}); choose a writable place for {option}") from None
    try:
        try:
            yield tmp
            with interrupts_ignored():
                replace(dst, tmp)
        except OSError as e:
            raise ErnieError(f"{dst}: writing failed ({e.strerror or e}); nothing was written. "
                             f"Free disk space or choose another {option}") from None
    except BaseException:
        with interrupts_ignored():
            shutil.rmtree(tmp, ignore_errors=True)
            for parent in reversed(made):
                parent.rmdir()
        raise


def replace(dst: Path, tmp: Path):
    """Put the finished `tmp` at `dst`. An existing `dst` is swapped with it in one step where Linux can
    (renameat2 RENAME_EXCHANGE), then deleted; elsewhere it is first moved aside into a hidden
    `.DST.old-*` sibling, from which `recover_overwritten` puts it back should the process die before
    the second rename."""
    if not (dst.exists() or dst.is_symlink()):
        tmp.rename(dst)
    elif exchange(tmp, dst):
        remove(tmp)  # the old DST now
    else:
        old = hidden_sibling(dst, "old")
        dst.rename(old / dst.name)
        tmp.rename(dst)
        remove(old)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the C library, the kernel or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def remove(path: Path):
    """Best effort: DST is complete by now, and an old file that resists deletion only costs disk space."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink()


def recover_overwritten(dst: Path):
    """Put back a DST that an --overwrite, killed between its two renames, left in a hidden `.DST.old-*`
    sibling, and say so."""
    if dst.exists() or dst.is_symlink():
        return
    for old in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.old-*")):
        kept = old / dst.name
        if kept.exists() or kept.is_symlink():
            kept.rename(dst)
            old.rmdir()
            raise ErnieError(f"{dst}: an earlier --overwrite was interrupted after moving the previous DST aside; "
                             f"it is now back in place (from {old.name}). Run the command again")


@contextmanager
def interrupts_ignored():
    """SIGINT and SIGTERM ignored within the block: for steps that must not stop halfway (only the main
    thread can set signal handlers; elsewhere the block runs unprotected)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def hidden_sibling(dst: Path, role: str) -> Path:
    path = dst.with_name(f".{dst.name}.{role}-{secrets.token_hex(4)}")
    path.mkdir()  # unlike tempfile.mkdtemp, honours the umask: DST gets the usual permissions
    return path


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool):
    """Bytes and bytes/s on stderr; silent when disabled or when stderr is not a terminal."""
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=None if enabled else True, leave=False) as bar:
        yield bar


def open_checkpoint(directory: Path, allow_pickle: bool):
    """safetensors weights if there are any (always preferred); else *.pdparams, only with `allow_pickle`."""
    pickles = sorted(directory.glob("*.pdparams"))
    if not pickles or any(directory.glob("*.safetensors")):
        return Checkpoint(directory)
    if not allow_pickle:
        raise ErnieError(f"{directory}: holds only *.pdparams weights, a pickle: loading one runs code stored in "
                         "the file. Pass --allow-pickle if you trust its origin")
    return PickledCheckpoint(pickles)


class NumpyUnpickler(pickle.Unpickler):
    """paddle.save writes plain numpy arrays; refusing every other class keeps a hostile file from running code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


class PickledCheckpoint:
    """*.pdparams weights with the reading interface of `Checkpoint`. A pickle cannot be read lazily, so
    the whole file is in memory: prefer safetensors for big models."""

    def __init__(self, files: list[Path]):
        self.arrays: dict[str, np.ndarray] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            try:
                with open(file, "rb") as f:
                    state = NumpyUnpickler(f).load()
            except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as e:
                raise ErnieError(f"{file}: cannot read as paddle.save weights ({e})") from None
            offset = 0
            for name, array in state.items():
                if not isinstance(array, np.ndarray):
                    continue  # paddle.save also stores a name table next to the weights
                # Paddle keeps bf16 as uint16 bits in numpy.
                dtype = "bfloat16" if array.dtype == np.uint16 else array.dtype.name
                if dtype not in FLOAT_DTYPES:
                    raise ErnieError(f"{file}: tensor {name!r} has unsupported dtype {array.dtype}")
                self.arrays[name] = array
                self.tensors[name] = TensorInfo(name, dtype, array.shape, file, offset, offset + array.nbytes)
                offset += array.nbytes
        if not self.tensors:
            raise ErnieError(f"{files[0].parent}: the *.pdparams files hold no tensors")

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def dtype(self, name: str) -> str:
        return self.tensors[name].dtype

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.arrays[name] if rows is None else self.arrays[name][rows[0]:rows[1]]

    def close(self):
        self.arrays.clear()

