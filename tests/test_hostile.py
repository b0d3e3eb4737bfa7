"""Hostile and careless input, each case through the real command line (`python -m converters`,
`python -m ernie_paddle`): one error line naming the file, tensor or option, a non-zero exit, and
nothing half-written; the model directory is never left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import deserialize

from ernie_paddle.demo import DEMO_MODEL as DEMO

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
PROMPT = "The capital of France is"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
OUTPUT_FILES = {"config.json", WEIGHTS, "generation_config.json", "special_tokens_map.json", "tokenizer.model",
                "tokenizer_config.json"}  # a conversion of the demo model writes exactly these


def run(module: str, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def convert(*args, **kwargs):
    return run("converters", *args, "--quiet", **kwargs)


def generate(model, *extra, **kwargs):
    return run("ernie_paddle", "generate", "--model", model, "--prompt", PROMPT, "--device", "cpu",
               "--max-new-tokens", "8", *extra, **kwargs)


def error_line(proc, prefix: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "), proc.stderr
    return lines[0]


def convert_fails(src, dst, *phrases, extra=()):
    line = error_line(convert("pt2paddle", src, dst, *extra), "convert")
    for phrase in phrases:
        assert phrase in line, line
    assert_nothing_written(dst)


def generate_fails(model, *phrases, extra=()):
    line = error_line(generate(model, *extra), "ernie-paddle generate")
    for phrase in phrases:
        assert phrase in line, line


def assert_nothing_written(dst: Path):
    assert not dst.exists()
    assert not leftovers(dst)


def leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.*"))


def demo_copy(tmp_path, name="model") -> Path:
    return Path(shutil.copytree(DEMO, tmp_path / name))


def tensors_of(path: Path) -> list[tuple[str, str, list, bytes]]:
    """(name, dtype code, shape, raw bytes) by name, as the safetensors library reads them."""
    return sorted((name, t["dtype"], t["shape"], bytes(t["data"])) for name, t in deserialize(path.read_bytes()))


def write_raw(path: Path, header, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def write_tensors(path: Path, tensors):
    header, data = {}, b""
    for name, code, shape, raw in tensors:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    write_raw(path, header, data)
    return header, data


# safetensors headers

def test_overlapping_data_offsets(tmp_path):
    """up_proj's bytes are gate_proj's: the file is otherwise consistent, and the safetensors library refuses it."""
    model = demo_copy(tmp_path)
    up = "model.layers.0.mlp.up_proj.weight"
    tensors = tensors_of(model / WEIGHTS)
    header, data = write_tensors(model / WEIGHTS, [t for t in tensors if t[0] != up])
    header[up] = header["model.layers.0.mlp.gate_proj.weight"] | {"shape": next(t[2] for t in tensors if t[0] == up)}
    write_raw(model / WEIGHTS, header, data)
    phrases = ("model.safetensors: corrupt safetensors header", "model.layers.0.mlp.", "overlaps the tensor before it")
    convert_fails(model, tmp_path / "out", *phrases)
    generate_fails(model, *phrases)


@pytest.mark.parametrize("how", ["strings", "floats", "list"])
def test_offsets_of_the_wrong_type_or_a_list_header(tmp_path, how):
    model = demo_copy(tmp_path)
    header, data = write_tensors(model / WEIGHTS, tensors_of(model / WEIGHTS))
    entry = header["model.norm.weight"]
    if how == "strings":
        entry["data_offsets"] = [str(o) for o in entry["data_offsets"]]
    elif how == "floats":
        entry["data_offsets"] = [float(o) for o in entry["data_offsets"]]
    else:
        header = list(header.items())
    write_raw(model / WEIGHTS, header, data)
    phrases = ["model.safetensors: corrupt safetensors"] + (
        ["not a JSON object"] if how == "list" else ["'model.norm.weight'", "not a pair of non-negative integers"])
    convert_fails(model, tmp_path / "out", *phrases)
    generate_fails(model, *phrases)


def test_integer_norm_weight(tmp_path):
    model = demo_copy(tmp_path)
    tensors = [(n, "I16", s, r) if n == "model.norm.weight" else (n, c, s, r)
               for n, c, s, r in tensors_of(model / WEIGHTS)]
    write_tensors(model / WEIGHTS, tensors)
    phrases = ("model.safetensors: tensor 'model.norm.weight' is stored as int16", "must be float32, float16, bfloat16")
    convert_fails(model, tmp_path / "out", *phrases)
    generate_fails(model, *phrases)


def test_fifo_as_model_file(tmp_path):
    model = demo_copy(tmp_path)
    (model / WEIGHTS).unlink()
    os.mkfifo(model / WEIGHTS)
    convert_fails(model, tmp_path / "out", "model.safetensors: not a regular file")
    generate_fails(model, "model.safetensors: not a regular file")


def test_fifo_as_tokenizer_file_in_convert(tmp_path):
    model = demo_copy(tmp_path)
    (model / "tokenizer.model").unlink()
    os.mkfifo(model / "tokenizer.model")
    convert_fails(model, tmp_path / "out", "tokenizer.model: not a regular file")


# Index files

def split_into_shards(model: Path, directory: Path) -> dict:
    """The demo's weights as two shards + index in `directory`; returns the weight map."""
    tensors = tensors_of(model / WEIGHTS)
    half = len(tensors) // 2
    weight_map = {}
    for k, part in enumerate([tensors[:half], tensors[half:]], 1):
        file = f"model-0000{k}-of-00002.safetensors"
        write_tensors(directory / file, part)
        weight_map.update({name: file for name, *_ in part})
    return weight_map


@pytest.mark.parametrize("where", ["../../../../etc/passwd", "absolute"])
def test_index_naming_a_path_outside_the_directory(tmp_path, where):
    """The outside file holds the complete weights: read, it would load silently."""
    model = demo_copy(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (model / WEIGHTS).rename(outside / WEIGHTS)
    shard = str(outside / WEIGHTS) if where == "absolute" else where
    names = [name for name, *_ in tensors_of(outside / WEIGHTS)]
    (model / INDEX).write_text(json.dumps({"weight_map": {name: shard for name in names}}))
    phrases = (f"{INDEX}: names shard {shard!r}, which is not a plain file name", "may only name files beside it")
    convert_fails(model, tmp_path / "out", *phrases)
    if where == "absolute":
        generate_fails(model, *phrases)


def test_weight_map_that_is_a_list(tmp_path):
    model = demo_copy(tmp_path)
    weight_map = split_into_shards(model, model)
    (model / WEIGHTS).unlink()
    (model / INDEX).write_text(json.dumps({"weight_map": sorted(set(weight_map.values()))}))
    phrases = (f"{INDEX}: corrupt index (weight_map must map tensor names to shard file names)",)
    convert_fails(model, tmp_path / "out", *phrases)
    generate_fails(model, *phrases)


def test_symlinked_shards_as_the_hub_cache_makes(tmp_path):
    """snapshots/<rev>/ holds symlinks into blobs/: followed, since the link itself is in the directory."""
    blobs, model = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    model.mkdir()
    weight_map = split_into_shards(DEMO, blobs)
    (blobs / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for item in [*DEMO.iterdir(), *blobs.iterdir()]:
        if item.name != WEIGHTS:
            (model / item.name).symlink_to(item)
    reference = generate(DEMO)
    linked = generate(model)
    assert linked.returncode == 0 and linked.stdout == reference.stdout, linked.stderr
    proc = convert("pt2paddle", model, tmp_path / "P")
    assert proc.returncode == 0, proc.stderr
    assert run("converters", "verify", tmp_path / "P", DEMO, "--quiet").returncode == 0


# config.json

def test_zero_attention_heads(tmp_path):
    model = demo_copy(tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_attention_heads": 0, "num_key_value_heads": 0}))
    phrases = ("config.json: num_attention_heads is 0; it must be a positive integer",)
    convert_fails(model, tmp_path / "out", *phrases)
    generate_fails(model, *phrases)


# convert: what is copied, where it may go, interruptions

def test_destination_inside_the_source_and_what_is_copied(tmp_path):
    model = demo_copy(tmp_path)
    (model / "runs").mkdir()
    (model / "runs" / "events.bin").write_bytes(os.urandom(1 << 20))
    (model / "stray.py").write_text("print('not part of a model')\n")
    for extra in ((), ("--overwrite",)):
        convert_fails(model, model / "out", "DST is inside SRC", "choose a DST outside", extra=extra)
    proc = convert("pt2paddle", model, tmp_path / "P")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "P").iterdir()} == OUTPUT_FILES  # no runs/, stray.py or facts.json


# Runs the convert CLI with one function wrapped, to act at a chosen moment of a real conversion.
HOOKED_CLI = """
import os, signal, sys, time
from pathlib import Path
import converters.convert as convert
# Ctrl-C as in a terminal: a shell's background job (a CI run, say) starts with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
{hook}
from converters.cli import main
sys.exit(main(sys.argv[1:]))
"""


def hooked_convert(hook: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOOKED_CLI.format(hook=hook), *map(str, args), "--quiet"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, code, message", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_signal_during_a_conversion_leaves_nothing(tmp_path, sig, code, message):
    dst = tmp_path / "out" / "P"
    ready = tmp_path / "ready"
    hook = f"""
produce, calls = convert.Tensor.produce, []
def slow_produce(self):
    calls.append(1)
    if len(calls) == 5:  # four tensors written into the hidden staging directory
        Path({str(ready)!r}).touch()
        time.sleep(60)
    return produce(self)
convert.Tensor.produce = slow_produce
"""
    proc = hooked_convert(hook, "pt2paddle", DEMO, dst)
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    staging = leftovers(dst)
    assert ready.exists() and len(staging) == 1 and staging[0].startswith(".P.partial-"), proc.communicate()
    assert (dst.parent / staging[0] / WEIGHTS).stat().st_size > 0
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code
    assert err.strip().splitlines() == [f"convert: {message}; nothing was written"]
    assert not (tmp_path / "out").exists()  # made for DST, removed with it


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_interrupt_between_the_steps_of_overwrite(tmp_path, swap):
    """SIGINT and SIGTERM arriving mid-swap wait for it: DST ends complete and new, nothing left over."""
    dst = tmp_path / "P"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    interrupt = "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM)"
    if swap == "exchange":
        hook = f"""
exchange = convert.exchange
def exchange_then_interrupt(a, b):
    assert exchange(a, b), "renameat2 RENAME_EXCHANGE unavailable here"
    {interrupt}
    return True
convert.exchange = exchange_then_interrupt
"""
    else:
        hook = f"""
convert.exchange = lambda a, b: False
rename, calls = Path.rename, []
def rename_then_interrupt(self, target):
    result = rename(self, target)
    calls.append(1)
    if len(calls) == 1:
        {interrupt}
    return result
Path.rename = rename_then_interrupt
"""
    proc = hooked_convert(hook, "pt2paddle", DEMO, dst, "--overwrite")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.startswith(f"wrote {dst}")
    assert {p.name for p in dst.iterdir()} == OUTPUT_FILES
    assert leftovers(dst) == []


def test_overwrite_killed_between_its_two_renames_is_recovered(tmp_path):
    """Where directories cannot be swapped, a process killed outright between moving DST aside and putting
    the new one in place: the next run puts the old DST back and says so."""
    dst = tmp_path / "P"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    hook = """
convert.exchange = lambda a, b: False
rename, calls = Path.rename, []
def rename_then_die(self, target):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)
Path.rename = rename_then_die
"""
    proc = hooked_convert(hook, "pt2paddle", DEMO, dst, "--overwrite")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists() and any(name.startswith(".P.old-") for name in leftovers(dst))
    line = error_line(convert("pt2paddle", DEMO, dst, "--overwrite"), "convert")
    assert "an earlier --overwrite was interrupted after moving the previous DST aside" in line
    assert "it is now back in place" in line and "Run the command again" in line
    assert [p.name for p in dst.iterdir()] == ["stale.txt"]
    assert not any(name.startswith(".P.old-") for name in leftovers(dst))
    for partial in dst.parent.glob(".P.partial-*"):  # what SIGKILL leaves: the finished new output, unused
        shutil.rmtree(partial)
    proc = convert("pt2paddle", DEMO, dst, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in dst.iterdir()} == OUTPUT_FILES and leftovers(dst) == []


# Sampling parameters

@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "temperature nan: must be a finite number >= 0"),
    ("--seed", "-1", "seed -1: must be an integer in 0..18446744073709551615"),
    ("--seed", str(2**70), f"seed {2**70}: must be an integer in 0..18446744073709551615"),
    ("--stop", "", "--stop '': an empty stop string stops nothing"),
])
def test_bad_sampling_option_on_the_command_line(flag, value, message):
    generate_fails(DEMO, message, extra=(flag, value))


def test_underflowing_temperature_is_greedy_on_the_command_line():
    greedy = generate(DEMO)
    tiny = generate(DEMO, "--temperature", "1e-38", "--seed", "3")
    assert tiny.returncode == 0 and tiny.stdout == greedy.stdout and "Paris" in greedy.stdout, tiny.stderr


@pytest.fixture(scope="module")
def predictor():
    from ernie_paddle import ErniePredictor
    return ErniePredictor.from_pretrained(DEMO, device="cpu", dtype="float32", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature nan"),
    (dict(temperature=float("inf")), "temperature inf"),
    (dict(temperature=10**400), "temperature 1000"),
    (dict(temperature="0.5"), "temperature '0.5'"),
    (dict(top_p=float("nan"), temperature=1.0), "top_p nan: must be in (0, 1]"),
    (dict(top_k=-1, temperature=1.0), "top_k -1: must be an integer >= 0"),
    (dict(top_k=2.5, temperature=1.0), "top_k 2.5"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty inf: must be a finite number > 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty 0.0"),
    (dict(seed=-1), "seed -1: must be an integer in 0..18446744073709551615"),
    (dict(seed=2**70), "seed 1180591620717411303424"),
    (dict(seed=True), "seed True"),
])
def test_bad_sampling_parameters_in_the_api(predictor, kwargs, message):
    from ernie_paddle import ErnieError
    with pytest.raises(ErnieError) as caught:
        predictor.generate(PROMPT, max_new_tokens=2, **kwargs)
    assert str(caught.value).startswith(message), caught.value


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 2e-38, 1e-30])
def test_tiny_temperatures_give_the_greedy_tokens(predictor, temperature):
    """Below float32's smallest normal number the temperature counts as 0; just above it the logits are
    shifted before scaling, so nothing overflows to inf and the draw is the greedy token."""
    greedy = predictor.generate(PROMPT, max_new_tokens=12)[0].token_ids
    sampled = predictor.generate(PROMPT, max_new_tokens=12, temperature=temperature, seed=5)[0].token_ids
    assert sampled == greedy


def test_largest_seed_is_accepted(predictor):
    runs = [predictor.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=2**64 - 1)[0].token_ids
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_ctrl_c_during_a_benchmark_says_so_and_writes_nothing(tmp_path):
    report = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "ernie_paddle", "bench", "--model", str(DEMO), "--device", "cpu",
                             "--input-lens", "3", "--output-lens", "400", "--repeat", "100", "--json", str(report)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    for line in proc.stdout:  # the table's head is printed before the first row is measured
        if line.startswith("|---"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "ernie-paddle bench: interrupted", err
    assert not report.exists()


# A Ctrl-C while the command's modules import (numpy's alone take a tenth of a second): here it lands
# exactly there, raised by the import of numpy.
INTERRUPTED_IMPORT = """
import builtins, sys
real_import = builtins.__import__

def interrupting(name, *args, **kwargs):
    if name == "numpy" or name.startswith("numpy."):
        raise KeyboardInterrupt
    return real_import(name, *args, **kwargs)

builtins.__import__ = interrupting
from ernie_paddle.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["generate", "--model", str(DEMO), "--prompt", "x"],
                                     ["convert", "pt2paddle", str(DEMO), "never-written"],
                                     ["deploy", "fastdeploy", "--model", str(DEMO), "--out", "never-written"]])
def test_ctrl_c_while_the_command_imports_says_so(tmp_path, command):
    run = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, *command], env=ENV, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 130 and run.stderr.strip().splitlines() == [f"ernie-paddle {command[0]}: interrupted"], \
        run.stderr
    assert not (tmp_path / "never-written").exists()
