"""Side-by-side CPU decode benchmark against llama.cpp at the same bits: llama-bench tg128 on BF16, Q8_0
and Q4_0 GGUFs against ErniePredictor with bf16 weights, wint8 and wint4, on the full-size
ERNIE-4.5-0.3B architecture with random weights, batch 1, alternating rounds.

    python tools/bench_vs_llamacpp.py [--checkpoint DIR] [--rounds 3] [--new-tokens 128] [--threads 2]
                                      [--json OUT]
    python tools/bench_vs_llamacpp.py --kl [--checkpoint DIR] [--kl-context 32] [--kl-initializer 0.15 0.05]
                                      [--kl-text FILE] [--json OUT]

--kl compares the quantization error instead: llama.cpp's own figures from llama-perplexity
(--kl-divergence-base on the F32 GGUF, then --kl-divergence on Q8_0 and Q4_0) against ErniePredictor's
wint8 and wint4 against its float32 run, the KL computed by ernie_paddle.check, over the same
positions of the same tokens: those llama-perplexity stored in its base file (the text of check's 8
prompts, or --kl-text, in chunks of --kl-context tokens, each scored on its second half). Without --checkpoint it runs
on the tiny demo model and on random 0.3B models with spread-out weights (--kl-initializer 0.15 0.05).

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
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_transformers import ARCHITECTURE, PROMPT_LEN, decode_tps  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ["llama-bench", "llama-quantize", "llama-perplexity"]
DEMO = Path(__file__).parent.parent / "ernie_paddle" / "assets" / "ernie-4.5-tiny-demo-PT"
TOKENIZER_FILES = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
# (llama.cpp GGUF type, ernie-paddle quantization): the same bits per weight for the layers
PAIRS = [("BF16", None), ("Q8_0", "wint8"), ("Q4_0", "wint4")]
# llama-perplexity's context for --kl: check's 8 prompts are 231 tokens (demo tokenizer), 7 chunks of 32
# with 15 scored positions each; it prints its summary from 100 positions on.
KL_CONTEXT = 32
CUT_OFF = -1e4  # a log-probability whose probability is 0 in float64, but finite: 0 * (CUT_OFF - x) is 0
# The random models' weights for --kl, spread out (transformers' default is 0.02). At 0.15 the 18 layers
# amplify any rounding: ernie-paddle's float32 against llama.cpp's F32 reached KL 0.007, top-1 90%.
SPREAD_INITIALIZERS = [0.15, 0.05]


def cache_root() -> Path:
    from ernie_paddle.cpu_ops import cache_dir

    return cache_dir().parent / "llama.cpp"  # beside the kernels


def build_llama_cpp(root: Path) -> tuple[Path, Path]:
    """llama.cpp's source directory and its bin directory with TARGETS, built here once."""
    source = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    binaries = source / "build" / "bin"
    missing = [t for t in TARGETS if not (binaries / t).exists()]
    if not missing:
        return source, binaries
    if (source / "build" / "CMakeCache.txt").exists():  # built before this tool wanted more targets
        run_with_progress(["cmake", "--build", "build", "--target", *missing, "-j", str(os.cpu_count() or 1)], source)
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


def write_checkpoint(directory: Path, initializer_range: float = 0.02):
    """The random full-size architecture as a bf16 -PT checkpoint, with the demo model's tokenizer."""
    import torch
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    print(f"writing the random ERNIE-4.5-0.3B architecture to {directory} ...", file=sys.stderr)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    config = Ernie4_5Config(**ARCHITECTURE, initializer_range=initializer_range)
    Ernie4_5ForCausalLM(config).to(torch.bfloat16).save_pretrained(partial)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, partial / name)
    partial.rename(directory)


def ggufs(checkpoint: Path, source: Path, binaries: Path, out: Path, converted: str = "BF16") -> dict[str, Path]:
    """The checkpoint as a `converted` (BF16 or F32) GGUF (convert_hf_to_gguf.py) and its Q8_0 / Q4_0
    quantizations (the same from either: llama-quantize widens to float32 first)."""
    files = {kind: out / f"{kind.lower()}.gguf" for kind in (converted, "Q8_0", "Q4_0")}
    if not files[converted].exists():
        print(f"converting {checkpoint} to GGUF ...", file=sys.stderr)
        subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype",
                        converted.lower(), "--outfile", str(files[converted])], check=True, capture_output=True)
    for kind, path in files.items():
        if not path.exists():
            subprocess.run([str(binaries / "llama-quantize"), str(files[converted]), str(path), kind],
                           check=True, capture_output=True)
    return files


def llama_bench(binaries: Path, gguf: Path, threads: int, new_tokens: int) -> float:
    """llama-bench tg`new_tokens` on `threads` threads, one repetition: tokens per second."""
    out = subprocess.run([str(binaries / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
                          "-n", str(new_tokens), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)[0]["avg_ts"]


# --- --kl: the quantization error of both at the same bits ----------------------------------------

def llama_perplexity(binaries: Path, gguf: Path, base: Path, threads: int, text: Path | None = None,
                     context: int = KL_CONTEXT) -> dict | None:
    """With `text`, write the base file (llama-perplexity --kl-divergence-base: the text's tokens and the
    model's log-probabilities at the scored positions); without, compare `gguf` against it
    (--kl-divergence) and return llama.cpp's mean KL and top-1 agreement. KV cache in float32."""
    command = [str(binaries / "llama-perplexity"), "-m", str(gguf), "-t", str(threads), "-c", str(context),
               "-ctk", "f32", "-ctv", "f32", "--kl-divergence-base", str(base)]
    command += ["-f", str(text)] if text else ["--kl-divergence"]
    out = subprocess.run(command, capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0 or ("Final estimate" if text else "Mean    KLD:") not in log:  # e.g. a text too short
        raise SystemExit(f"{' '.join(command)} failed:\n" + "\n".join(log.splitlines()[-20:]))
    if text:
        return None
    kl = re.search(r"Mean    KLD:\s*([-\d.]+)", log)[1]
    top1 = re.search(r"Same top p:\s*([\d.]+)", log)[1]
    return dict(mean_kl=float(kl), top1=float(top1) / 100)


def read_kl_base(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """llama-perplexity's base file: the evaluated tokens [chunks, context] and its log-probabilities
    [chunks * scored, vocab] at the scored positions (each chunk's context // 2 .. context - 2; stored as
    a scale and an offset per position and 16-bit steps, 0 standing for 16 nats or more below the top,
    taken here as probability 0)."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise SystemExit(f"{path}: not a llama-perplexity --kl-divergence-base file")
        context, vocab, chunks = np.fromfile(f, np.int32, 3)
        tokens = np.fromfile(f, np.int32, chunks * context).reshape(chunks, context)
        row = 2 * ((vocab + 1) // 2) + 4
        stored = np.fromfile(f, np.uint16).reshape(-1, row)
    scale_offset = stored[:, :4].copy().view(np.float32)
    steps = stored[:, 4:4 + vocab]
    log_probs = steps * scale_offset[:, :1] + scale_offset[:, 1:2]
    log_probs[steps == 0] = CUT_OFF  # as llama.cpp's own KL, which leaves them out
    return tokens, log_probs


def scored_logits(predictor, chunks: np.ndarray, bos: int | None) -> np.ndarray:
    """The model's logits at llama-perplexity's scored positions: each chunk evaluated alone from position
    0 (its first token replaced by `bos` where llama.cpp adds one), rows context // 2 .. context - 2 (the
    predictions of the tokens after them, but the last, which has none)."""
    context = chunks.shape[1]
    rows = []
    for chunk in chunks:
        ids = [int(t) for t in chunk]
        if bos is not None:
            ids[0] = bos
        rows.append(predictor.logits([ids])[0][context // 2:context - 1])
    return np.concatenate(rows)


def distance(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Mean KL(reference ‖ candidate) over the positions (logits or log-probabilities [positions, vocab]),
    and the fraction of positions whose top-1 tokens agree."""
    from ernie_paddle.check import kl_divergence, log_softmax

    log_p, log_q = log_softmax(reference), log_softmax(candidate)
    kl = kl_divergence(log_p, log_q)
    top1 = log_p.argmax(-1) == log_q.argmax(-1)
    return dict(mean_kl=float(kl.mean()), max_kl=float(kl.max()), top1=float(top1.mean()))


def adds_bos(source: Path, gguf: Path) -> int | None:
    """The BOS token id if llama.cpp puts it at the start of each chunk of this model, else None."""
    sys.path.insert(0, str(source / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    add = reader.get_field("tokenizer.ggml.add_bos_token")
    if add is None:
        raise SystemExit(f"{gguf}: no tokenizer.ggml.add_bos_token, so the evaluated tokens are not known")
    return int(reader.get_field("tokenizer.ggml.bos_token_id").contents()) if add.contents() else None


def kl_model(checkpoint: Path, source: Path, binaries: Path, root: Path, threads: int, context: int,
             text: Path | None = None) -> dict:
    """One model's KL table: llama.cpp's Q8_0 / Q4_0 and ernie-paddle's wint8 / wint4, each against its own
    float32, on the tokens and positions of llama-perplexity's base file."""
    from ernie_paddle import ErniePredictor
    from ernie_paddle.check import DEFAULT_PROMPTS

    out = root / "gguf" / checkpoint.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    files = ggufs(checkpoint, source, binaries, out, converted="F32")
    if text is None:
        text = out / "check-prompts.txt"
        text.write_text("\n".join(DEFAULT_PROMPTS) + "\n", encoding="utf-8")
    base = out / f"kl-base-{text.stem}-c{context}.bin"
    print(f"llama-perplexity on {checkpoint.name} ...", file=sys.stderr)
    llama_perplexity(binaries, files["F32"], base, threads, text, context)
    theirs = {kind: llama_perplexity(binaries, files[kind], base, threads) for kind in ("Q8_0", "Q4_0")}

    tokens, llama_f32 = read_kl_base(base)
    bos = adds_bos(source, files["F32"])
    logits = {}
    for quantization in (None, "wint8", "wint4"):
        predictor = ErniePredictor.from_pretrained(checkpoint, device="cpu", dtype="float32", progress=False,
                                                   weight_dtype="auto" if quantization else "float32",
                                                   quantization=quantization)
        logits[quantization] = scored_logits(predictor, tokens, bos)
        del predictor
    if logits[None].shape != llama_f32.shape:
        raise SystemExit(f"{base}: {llama_f32.shape[0]} scored positions, ernie-paddle scored {logits[None].shape[0]}")
    return dict(checkpoint=str(checkpoint), chunks=int(tokens.shape[0]), context=context,
                positions=int(llama_f32.shape[0]),
                # both float32 runs on the same positions: near 0 only if the tokens and positions match
                float32_vs_llama_cpp_f32=distance(llama_f32, logits[None]),
                results={kind: dict(quantization=quantization, llama_cpp=theirs[kind],
                                    ernie_paddle=distance(logits[None], logits[quantization]))
                         for kind, quantization in PAIRS[1:]})


def run_kl(args, root: Path, source: Path, binaries: Path) -> int:
    if args.checkpoint:
        models = {Path(args.checkpoint).name: Path(args.checkpoint)}
    else:
        models = {"tiny demo model (trained)": DEMO}
        for spread in args.kl_initializer:
            checkpoint = root / f"ernie-4.5-0.3b-random-spread-{spread:g}-PT"
            if not (checkpoint / "config.json").exists():
                write_checkpoint(checkpoint, spread)
            models[f"0.3B architecture, random weights (initializer_range {spread:g})"] = checkpoint
    text = Path(args.kl_text).resolve() if args.kl_text else None
    results = {name: kl_model(path, source, binaries, root, args.threads, args.kl_context, text)
               for name, path in models.items()}
    described = args.kl_text or "ernie-paddle check's 8 prompts"
    print(f"KL(float32 ‖ quantized) in nats, mean over llama-perplexity's scored positions of {described} "
          f"(-c {args.kl_context}); top-1: positions whose most likely token agrees with float32's\n")
    print("| model | weights (llama.cpp / ernie-paddle) | positions | llama.cpp KL | ernie-paddle KL "
          "| llama.cpp top-1 | ernie-paddle top-1 |")
    print("|---|---|---|---|---|---|---|")
    for name, model in results.items():
        for kind, r in model["results"].items():
            print(f"| {name} | {kind} / {r['quantization']} | {model['positions']} | {r['llama_cpp']['mean_kl']:.6f} "
                  f"| {r['ernie_paddle']['mean_kl']:.6f} | {r['llama_cpp']['top1']:.1%} "
                  f"| {r['ernie_paddle']['top1']:.1%} |")
        aligned = model["float32_vs_llama_cpp_f32"]
        print(f"| {name} | float32 against llama.cpp's F32 | {model['positions']} | | {aligned['mean_kl']:.2e} | "
              f"| {aligned['top1']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(tool="kl_vs_llamacpp", llama_cpp_python=LLAMA_CPP_PYTHON,
                                                   threads=args.threads, text=described, models=results), indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a -PT checkpoint with tokenizer files (default: a random one)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each system's best is kept")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write every round's figures here")
    parser.add_argument("--kl", action="store_true", help="compare the KL to float32 at the same bits instead")
    parser.add_argument("--kl-context", type=int, default=KL_CONTEXT, help="llama-perplexity's -c for --kl")
    parser.add_argument("--kl-text", default=None, help="--kl over this text file (default: check's 8 prompts); "
                        "ernie-paddle holds 3 x positions x vocabulary float32 logits")
    parser.add_argument("--kl-initializer", type=float, nargs="+", default=SPREAD_INITIALIZERS,
                        help="--kl without --checkpoint: the random 0.3B models' initializer_range")
    args = parser.parse_args(argv)

    root = cache_root()
    source, binaries = build_llama_cpp(root)
    if args.kl:
        return run_kl(args, root, source, binaries)
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
