"""Property-based tests of the safetensors reader and the index resolver, with the `safetensors` library as
the oracle: for any file made by mutating a valid one, the project's reader returns exactly what the
library returns, or raises its one-line ErnieError; where the library refuses a file, so does the project.
Index files may name any path: nothing outside the model directory is ever opened.

Bounded for CI (a fixed set of examples, a few seconds); FUZZ_EXAMPLES=5000 searches longer."""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, deserialize, safe_open

from ernie_paddle.checkpoint import CODES, INDEX_FILE, Checkpoint
from ernie_paddle.errors import ErnieError

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 300))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
            "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1}
NAMES = ["a", "b", "model.norm.weight", "x.y", "\u00e9t\u00e9", "__metadata__x", "two\nlines"]
ODD_VALUES = [None, True, -1, 1.5, 2.0, "3", [], {}, [0], 2**64, -0.0, float("nan")]

OPENED: list = []  # paths opened while recording; an audit hook cannot be removed, so it is installed once


def _record_opens(event, args):
    if event == "open" and OPENED and not isinstance(args[0], int):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)


def opened_during(action):
    """The paths `action()` opens, and its result or ErnieError."""
    OPENED[:] = [None]  # non-empty: recording
    try:
        outcome = action()
    except ErnieError as e:
        outcome = e
    finally:
        paths = OPENED[1:]
        OPENED.clear()
    return paths, outcome


def safetensors_bytes(header, data: bytes, raw_header: bytes | None = None, length_delta: int = 0) -> bytes:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(blob) + length_delta)) + blob + data


@st.composite
def valid_tensors(draw):
    """[(name, dtype code, shape, raw bytes)], and metadata (or None)."""
    names = draw(st.lists(st.sampled_from(NAMES), max_size=4, unique=True))
    tensors = []
    for name in names:
        code = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[code]
        tensors.append((name, code, shape, draw(st.binary(min_size=nbytes, max_size=nbytes))))
    metadata = draw(st.none() | st.dictionaries(st.sampled_from(["format", "k"]), st.sampled_from(["pt", "np", ""])))
    return tensors, metadata


def header_of(tensors, metadata) -> tuple[dict, bytes]:
    header, offset, data = {}, 0, b""
    for name, code, shape, raw in tensors:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    return header, data


def mutate(draw, header: dict, data: bytes) -> bytes:
    """One valid file turned into a (possibly) broken one by a few random edits."""
    raw_header, length_delta = None, 0
    names = [n for n in header if n != "__metadata__"]
    odd = st.sampled_from(ODD_VALUES)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["offsets", "overlap", "layout", "shape", "dtype", "entry", "top", "metadata",
                                     "length", "data", "text"]))
        entry = header[draw(st.sampled_from(names))] if names else None
        entry = entry if isinstance(entry, dict) else {}  # edits to a removed or replaced entry go nowhere
        offsets, shape = entry.get("data_offsets"), entry.get("shape")
        if kind == "offsets" and isinstance(offsets, list):
            offsets[draw(st.integers(0, 1))] = draw(st.integers(-2, len(data) + 2) | odd)
        elif kind == "overlap" and names:
            other = header[draw(st.sampled_from(names))]
            if isinstance(other, dict) and isinstance(other.get("data_offsets"), list):
                entry["data_offsets"] = list(other["data_offsets"])
        elif kind == "layout":  # every range moved, each start anywhere up to the end so far: overlaps, gaps,
            end = 0             # any order, the data cut or padded to the last end
            for other in header.values() if isinstance(header, dict) else ():
                ranges = other.get("data_offsets") if isinstance(other, dict) else None
                if isinstance(ranges, list) and len(ranges) == 2 and all(type(o) is int for o in ranges):
                    begin = draw(st.integers(0, end))
                    other["data_offsets"] = [begin, begin + ranges[1] - ranges[0]]
                    end = max(end, begin + ranges[1] - ranges[0])
            data = data[:end].ljust(end, b"\5")
        elif kind == "shape" and isinstance(shape, list):
            action = draw(st.sampled_from(["set", "append", "pop", "replace"]))
            if action == "set" and shape:
                shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(-1, 5) | odd)
            elif action == "append":
                shape.append(draw(st.integers(0, 2) | odd))
            elif action == "pop" and shape:
                shape.pop()
            elif action == "replace":
                entry["shape"] = draw(odd)
        elif kind == "dtype" and entry:
            entry["dtype"] = draw(st.sampled_from(sorted(ITEMSIZE) + ["f32", "F8_E5M2", "X", "", "F\n32"]) | odd)
        elif kind == "entry" and names:
            name = draw(st.sampled_from(names))
            action = draw(st.sampled_from(["replace", "drop_key", "extra_key"]))
            if action == "replace":
                header[name] = draw(odd)
            elif isinstance(header[name], dict) and action == "drop_key":
                header[name].pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
            elif isinstance(header[name], dict):
                header[name]["extra"] = 1
        elif kind == "top":
            header = draw(st.sampled_from([[], 7, "x", None, [header]]))
            names = []
        elif kind == "metadata" and isinstance(header, dict):
            header["__metadata__"] = draw(odd | st.just({"k": 1}) | st.just({"k": "v"}))
        elif kind == "length":
            length_delta = draw(st.integers(-9, 9) | st.just(1 << 40))
        elif kind == "data":
            cut = draw(st.integers(-3, 3))
            data = data[:cut] if cut < 0 else data + b"\0" * cut
        elif kind == "text":  # what json.dumps never writes: leniencies Python's parser has and the library lacks
            text = json.dumps(header)
            raw_header = draw(st.sampled_from([
                text.replace("[0, ", "[-0, ", 1), text.replace("0", "0.0", 1), " " + text, text + "    ",
                text + "\0\0", text.replace("{", '{"a": 1, "a": 2, ', 1), text.replace("{", '{"x": NaN, ', 1),
                text.replace('"a"', '"\\ud800"', 1), text.encode("utf-16").decode("latin-1"), "\ufeff" + text,
            ])).encode("utf-8", "surrogatepass")
    return safetensors_bytes(header, data, raw_header, length_delta)


def library_view(path: Path):
    """{name: (dtype, shape, bytes)} and metadata as the safetensors library reads the file; None if it refuses."""
    try:
        tensors = {name: (t["dtype"], list(t["shape"]), bytes(t["data"])) for name, t in deserialize(path.read_bytes())}
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
    except SafetensorError:
        return None
    return tensors, metadata


def project_view(directory: Path):
    ckpt = Checkpoint(directory)
    try:
        tensors = {}
        for name, info in ckpt.tensors.items():
            read, mapped = ckpt.read(name).tobytes(), ckpt.get(name).tobytes()
            assert read == mapped, name
            tensors[name] = (CODES[info.dtype], list(info.shape), read)
        return tensors, ckpt.metadata
    finally:
        ckpt.close()


def assert_one_line(error: ErnieError):
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message


@FUZZ
@given(st.data(), valid_tensors())
def test_reader_agrees_with_the_safetensors_library(data, made):
    tensors, metadata = made
    header, blob = header_of(tensors, metadata)
    content = mutate(data.draw, header, blob)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        path = directory / "model.safetensors"
        path.write_bytes(content)
        expected = library_view(path)
        _, outcome = opened_during(lambda: project_view(directory))
    if isinstance(outcome, ErnieError):
        assert_one_line(outcome)
        # The project may refuse a few files the library reads: no tensors at all, dtypes it does not hold
        # (F8_*), and entries with keys beyond dtype, shape and data_offsets (which no writer makes).
        if expected is not None:
            assert (not expected[0] or any(code not in CODES.values() for code, _, _ in expected[0].values())
                    or b'"extra"' in content), (outcome, expected)
    else:
        assert expected is not None, "the library refuses this file, the project read it"
        assert outcome == expected


# The index resolver: shard names pointing anywhere, and a symlinked shard as the hub cache makes.

def write_valid(path: Path, tensors: dict):
    header, offset, data = {}, 0, b""
    for name, raw in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(raw)], "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    path.write_bytes(safetensors_bytes(header, data))


def index_candidates(directory: Path, outside: Path) -> list:
    return ["model-1.safetensors", "model-2.safetensors", "linked.safetensors", "missing.safetensors",
            "config.json", "subdir", "", ".", "..", "subdir/inner.safetensors", "../outside/outside.safetensors",
            str(outside / "outside.safetensors"), str(directory / "model-1.safetensors"), "a\0b",
            "a\nb.safetensors", 3, None, ["model-1.safetensors"]]


@FUZZ
@given(st.data())
def test_index_resolver_never_leaves_the_directory(data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        directory, outside = root / "model", root / "outside"
        (directory / "subdir").mkdir(parents=True)
        outside.mkdir()
        shards = {"model-1.safetensors": {"w1": b"\1\2"}, "model-2.safetensors": {"w2": b"\3"},
                  "linked.safetensors": {"w3": b"\4\5\6"}}
        for file in ("model-1.safetensors", "model-2.safetensors"):
            write_valid(directory / file, shards[file])
        write_valid(outside / "blob", shards["linked.safetensors"])  # the hub cache's layout: a symlink to a blob
        (directory / "linked.safetensors").symlink_to(outside / "blob")
        write_valid(outside / "outside.safetensors", {"w1": b"\7\7", "w9": b"\x09"})
        write_valid(directory / "subdir" / "inner.safetensors", {"w8": b"\x08"})
        (directory / "config.json").write_text("{}")

        candidates = index_candidates(directory, outside)
        weight_map = data.draw(st.dictionaries(st.sampled_from(["w1", "w2", "w3", "w9", "w8"]),
                                               st.sampled_from(candidates), max_size=4))
        proper = data.draw(st.integers(0, 9)) < 6
        index = {"weight_map": weight_map} if proper else data.draw(st.sampled_from([
            {"weight_map": list(weight_map.values())}, {"weight_map": None}, {}, [weight_map], "{not json"]))
        (directory / INDEX_FILE).write_text(index if isinstance(index, str) else json.dumps(index))

        paths, outcome = opened_during(lambda: project_view(directory))
        for path in paths:
            assert os.path.dirname(os.path.normpath(os.path.join(directory, path))) == str(directory), path

        consistent = proper and all(isinstance(f, str) and f in shards and name in shards[f]
                                    for name, f in weight_map.items())
        if isinstance(outcome, ErnieError):
            assert_one_line(outcome)
            assert not (consistent and weight_map), f"refused a valid index: {outcome}"
        else:
            assert consistent, f"accepted {index}"
            expected = {name: ("U8", [len(raw)], raw) for f in set(weight_map.values())
                        for name, raw in shards[f].items()}
            assert outcome == (expected, {})
