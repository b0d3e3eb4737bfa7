"""Side-by-side CPU decode benchmark against llama.cpp at the same bits: llama-bench tg128 on BF16, Q8_0
and Q4_0 GGUFs against ErniePredictor with bf16 weights, wint8 and wint4, on the full-size
ERNIE-4.5-0.3B architecture with random weights, batch 1, alternating rounds.

    python tools/bench_vs_llamacpp.py [--checkpoint DIR] [--rounds 3] [--new-tokens 128] [--threads 2]
                                      [--json OUT]

llama.cpp is built once for this machine from the llama-cpp-python sdist on PyPI (its vendor/llama.cpp,
-DGGML_NATIVE=ON; about 15 minutes on 2 cores) and cached in ~/.cache/ernie-paddle/llama.cpp
($ERNIE_PADDLE_CACHE/llama.cpp). Without --checkpoint a random bf16 -PT checkpoint is written there
too, with the demo model's SentencePiece tokenizer (llama.cpp's converter reads tokenizer.model and
pads the vocabulary), and converted with llama.cpp's convert_hf_to_gguf.py (its own gguf-py) and
llama-quantize.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_transformers import ARCHITECTURE, PROMPT_LEN, decode_tps  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ["llama-bench", "llama-quantize"]
DEMO = Path(__file__).parent.parent / "ernie_paddle" / "assets" / "ernie-4.5-tiny-demo-PT"
TOKENIZER_FILES = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
# (llama.cpp GGUF type, ernie-paddle quantization): the same bits per weight for the layers
PAIRS = [("BF16", None), ("Q8_0", "wint8"), ("Q4_0", "wint4")]


def cache_root() -> Path:
    from ernie_paddle.cpu_ops import cache_dir

    return cache_dir().parent / "llama.cpp"  # beside the kernels


def build_llama_cpp(root: Path) -> tuple[Path, Path]:
    """llama.cpp's source directory and its bin directory with TARGETS, built here once."""
    source = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    binaries = source / "build" / "bin"
    if all((binaries / t).exists() for t in TARGETS):
        return source, binaries
    root.mkdir(parents=True, exist_ok=True)
    if not source.exists():
        sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                            "--no-deps", "--no-binary", ":all:", "-d", str(root)], check=True)
        with tarfile.open(sdist) as archive:
            archive.extractall(root, filter="data")
    print("building llama.cpp for this machine (once, about 15 minutes on 2 cores) ...", file=sys.stderr)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run_with_progress(["cmake", "-B", "build", *generator, "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                       "-DCMAKE_BUILD_TYPE=Release"], source)
    run_with_progress(["cmake", "--build", "build", "--target", *TARGETS, "-j", str(os.cpu_count() or 1)], source)
    return source, binaries


def run_with_progress(command: list[str], cwd: Path):
    """Run `command`, showing its latest line (the build's [step/steps]) on one line of stderr."""
    started = time.perf_counter()
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        tail = []
        for line in process.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            print(f"\r\033[K{time.perf_counter() - started:5.0f} s  {line.strip()[:100]}", end="", file=sys.stderr)
        print(file=sys.stderr)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed in {cwd}:\n" + "\n".join(tail))


def write_checkpoint(directory: Path):
    """The random full-size architecture as a bf16 -PT checkpoint, with the demo model's tokenizer."""
    import torch
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    print(f"writing the random ERNIE-4.5-0.3B architecture to {directory} ...", file=sys.stderr)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    Ernie4_5ForCausalLM(Ernie4_5Config(**ARCHITECTURE)).to(torch.bfloat16).save_pretrained(partial)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, partial / name)
    partial.rename(directory)


def ggufs(checkpoint: Path, source: Path, binaries: Path, out: Path) -> dict[str, Path]:
    """The checkpoint as a BF16 GGUF (convert_hf_to_gguf.py) and its Q8_0 / Q4_0 quantizations."""
    files = {kind: out / f"ernie-0.3b-{kind.lower()}.gguf" for kind, _ in PAIRS}
    if not files["BF16"].exists():
        print("converting to GGUF ...", file=sys.stderr)
        subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", "bf16",
                        "--outfile", str(files["BF16"])], check=True, capture_output=True)
    for kind, path in files.items():
        if not path.exists():
            subprocess.run([str(binaries / "llama-quantize"), str(files["BF16"]), str(path), kind],
                           check=True, capture_output=True)
    return files


def llama_bench(binaries: Path, gguf: Path, threads: int, new_tokens: int) -> float:
    """llama-bench tg`new_tokens` on `threads` threads, one repetition: tokens per second."""
    out = subprocess.run([str(binaries / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
                          "-n", str(new_tokens), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)[0]["avg_ts"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a -PT checkpoint with tokenizer files (default: a random one)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each system's best is kept")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write every round's figures here")
    args = parser.parse_args(argv)

    root = cache_root()
    source, binaries = build_llama_cpp(root)
    checkpoint = Path(args.checkpoint) if args.checkpoint else root / "ernie-4.5-0.3b-random-PT"
    if not (checkpoint / "config.json").exists():
        write_checkpoint(checkpoint)
    models_dir = root / "gguf" / checkpoint.resolve().name
    models_dir.mkdir(parents=True, exist_ok=True)
    files = ggufs(checkpoint, source, binaries, models_dir)

    from ernie_paddle import ErniePredictor
    from ernie_paddle.bench import random_prompts, time_generation, wait_for_idle_cpu
    from ernie_paddle.device import cpu_threads

    prompt = random_prompts(ARCHITECTURE["vocab_size"], 1, PROMPT_LEN)
    ours = {}
    for _, quantization in PAIRS:
        model = ErniePredictor.from_pretrained(str(checkpoint), device="cpu", dtype="float32", progress=False,
                                               quantization=quantization).model
        time_generation(model, prompt, 4)  # warm-up
        ours[quantization] = model
    rounds = {kind: {"llama.cpp": [], "ernie-paddle": []} for kind, _ in PAIRS}
    for r in range(args.rounds):
        for kind, quantization in PAIRS:
            wait_for_idle_cpu()  # the machine is shared: each measurement starts on an idle CPU
            rounds[kind]["llama.cpp"].append(llama_bench(binaries, files[kind], args.threads, args.new_tokens))
            wait_for_idle_cpu()
            timing = time_generation(ours[quantization], prompt, args.new_tokens)
            rounds[kind]["ernie-paddle"].append(decode_tps(timing, args.new_tokens))
            print(f"round {r + 1}: {kind} llama.cpp {rounds[kind]['llama.cpp'][-1]:.1f}, ernie-paddle "
                  f"{quantization or 'bf16'} {rounds[kind]['ernie-paddle'][-1]:.1f} tok/s", file=sys.stderr)

    print(f"ERNIE-4.5-0.3B architecture, random weights, batch 1, {PROMPT_LEN}-token prompt, {args.new_tokens} new "
          f"tokens; llama-bench -t {args.threads} tg{args.new_tokens}, ernie-paddle on {cpu_threads()} threads; "
          f"best of {args.rounds} alternating rounds\n")
    print("| weights | llama.cpp (tok/s) | ernie-paddle (tok/s) | ratio |")
    print("|---|---|---|---|")
    results = {}
    for kind, quantization in PAIRS:
        theirs, mine = max(rounds[kind]["llama.cpp"]), max(rounds[kind]["ernie-paddle"])
        results[kind] = dict(quantization=quantization or "bf16", llama_cpp_tps=theirs, ernie_paddle_tps=mine,
                             ratio=mine / theirs, rounds=rounds[kind])
        print(f"| {kind} / {quantization or 'bf16'} | {theirs:.1f} | {mine:.1f} | {mine / theirs:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(new_tokens=args.new_tokens, threads=args.threads,
                                                   llama_cpp_python=LLAMA_CPP_PYTHON, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
