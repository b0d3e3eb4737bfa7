"""Conversion throughput and peak memory on the full-size ERNIE-4.5-0.3B architecture with random bf16
weights (about 720 MB): writes the source model, then times `convert pt2paddle`, `convert paddle2pt` and
`convert verify`, each in its own process so that its peak RSS is its own. Deletes everything afterwards.

    python tools/bench_convert.py [--layout pt|paddle] [--source-shard-size 200MB] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from converters.cli import parse_size
from converters.mapping import expected_paddle_shape, plan, pt_shapes
from ernie_paddle.checkpoint import INDEX_FILE, shard_names, write_safetensors
from ernie_paddle.config import ErnieConfig

CONFIG = ErnieConfig(vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
                     num_attention_heads=16, num_key_value_heads=2, head_dim=128)
LAYER_TENSORS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.qkv_proj.weight",
                 "self_attn.o_proj.weight", "mlp.up_gate_proj.weight", "mlp.down_proj.weight")


def random_bf16(shape, rng) -> np.ndarray:
    """Random bf16 bits of magnitude in [2^-7, 2^-6), either sign: realistic weights, never NaN or inf."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits &= 0x807F
    bits |= 0x3C00
    return bits


def source_tensors(layout: str) -> list[tuple[str, tuple]]:
    names = ["ernie.embed_tokens.weight", "ernie.norm.weight"] + [
        f"ernie.layers.{i}.{t}" for i in range(CONFIG.num_hidden_layers) for t in LAYER_TENSORS]
    groups, _ = plan(names, "paddle", tied=True)
    if layout == "paddle":
        return [(g.paddle, expected_paddle_shape(g.paddle, CONFIG)) for g in groups]
    return sorted((name, shape) for g in groups
                  for name, shape in zip(g.pt, pt_shapes(g, expected_paddle_shape(g.paddle, CONFIG), CONFIG)))


def write_source(directory: Path, layout: str, shard_size: int | None) -> int:
    """Write the random model; returns the size of its largest shard in bytes."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards, size = [[]], 0
    for name, shape in source_tensors(layout):
        nbytes = int(np.prod(shape)) * 2
        if shard_size and shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, "bfloat16", shape, lambda shape=shape: random_bf16(shape, rng)))
        size += nbytes
    files = shard_names(len(shards))
    for file, entries in zip(files, shards):
        write_safetensors(directory / file, entries, {"format": "pt" if layout == "pt" else "np"})
    if len(files) > 1:
        weight_map = {name: file for file, entries in zip(files, shards) for name, *_ in entries}
        total = sum(int(np.prod(shape)) * 2 for entries in shards for _, _, shape, _ in entries)
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = CONFIG.to_pt_dict("bfloat16") if layout == "pt" else CONFIG.to_paddle_dict("bfloat16")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return max((directory / f).stat().st_size for f in files)


# Runs the converter and reports its VmHWM: unlike ru_maxrss, it is not inherited across fork and exec.
CHILD = ("import sys; from converters.cli import main; code = main(sys.argv[1:]); "
         "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1], file=sys.stderr); "
         "sys.exit(code)")


def timed(*argv) -> tuple[float, int, str]:
    """Run the converter with ARGV; returns (seconds, peak RSS in bytes, its stdout)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv), "--quiet"], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"convert {argv[0]} failed: {proc.stderr.strip()}")
    return time.perf_counter() - start, int(proc.stderr.split()[-1]) * 1024, proc.stdout.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=["pt", "paddle"], default="pt", help="layout of the source model")
    p.add_argument("--source-shard-size", type=parse_size, default=None,
                   help="shard the source model (default: one file, as the published 0.3B)")
    p.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        src = work / f"src-{args.layout}"
        start = time.perf_counter()
        largest = write_source(src, args.layout, args.source_shard_size)
        nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"source: {args.layout} layout, {nbytes / 1e6:.1f} MB in {len(list(src.glob('*.safetensors')))} "
              f"file(s), largest {largest / 1e6:.1f} MB, written in {time.perf_counter() - start:.1f} s")
        there, back = ("pt2paddle", "paddle2pt") if args.layout == "pt" else ("paddle2pt", "pt2paddle")
        runs = [(there, src, work / "converted"), (back, work / "converted", work / "back"),
                ("verify", src, work / "back")]
        for command, a, b in runs:
            seconds, rss, out = timed(command, a, b)
            print(f"{command:9s} {seconds:6.2f} s  {nbytes / 1e6 / seconds:6.1f} MB/s (wall, incl. startup)  "
                  f"peak RSS {rss / 1e6:6.1f} MB = {rss / largest:.2f}x the largest shard | {out}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
