"""Side-by-side CPU benchmark: ErniePredictor against transformers `generate`, float32, greedy, on the
full-size ERNIE-4.5-0.3B architecture with random weights (speed does not depend on weight values).

    python tools/bench_vs_transformers.py [--new-tokens 128] [--prefill-len 512] [--batch 8]
                                          [--rounds 2] [--keep DIR] [--json OUT]

It writes the model as a bf16 -PT checkpoint with transformers, converts it to -Paddle, and then in
one run measures, alternating the systems round by round and keeping each one's best round:
- decode at batch 1 (7-token prompt) and time to first token: transformers, and ErniePredictor both
  with the weights as stored (bf16, widened as read: the default on CPU) and with float32 copies
  (--weight-dtype float32), all computing in float32;
- bare matmul passes over the same weights, Paddle's (float32 copies) and the CPU decoding
  kernel's (both): the decode ceilings, in tok/s;
- prefill of a long prompt, all three;
- aggregate decode throughput of ErniePredictor at batch B against batch 1;
- loading the -Paddle bf16 checkpoint until the first token, and the peak resident memory of a
  128-token float32 run, in a fresh process that never imports torch, for both weight dtypes.
With `--llama-gguf FILE` (an F32 GGUF of the same architecture) and `llama-bench` on PATH, llama.cpp's
tg/pp figures are printed too; ../shared/spec/anchors.md lists them for this machine kind.
`--json OUT` writes every printed figure to OUT (tools/render_docs.py renders it into the docs).
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

ARCHITECTURE = dict(vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
                    num_attention_heads=16, num_key_value_heads=2, head_dim=128, rope_theta=500000.0,
                    tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5, use_bias=False)
PROMPT_LEN = 7


def build(directory: Path) -> tuple[Path, Path]:
    """The random model as `directory`/pt (bf16, transformers) and `directory`/paddle (converted)."""
    pt, pd = directory / "pt", directory / "paddle"
    if not pd.exists():
        import torch
        from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

        from converters.convert import pt2paddle

        print(f"building the random ERNIE-4.5-0.3B architecture in {directory} ...", file=sys.stderr)
        torch.manual_seed(0)
        Ernie4_5ForCausalLM(Ernie4_5Config(**ARCHITECTURE)).to(torch.bfloat16).save_pretrained(pt)
        pt2paddle(pt, pd, progress=False)
    return pt, pd


def measure_load(directory: str, new_tokens: int, weight_dtype: str) -> dict:
    """Run in a fresh process: import, load the checkpoint as float32, generate; times and peak RSS."""
    start = time.perf_counter()
    from ernie_paddle import ErniePredictor
    from ernie_paddle.bench import peak_memory, weight_bytes
    imported = time.perf_counter()
    pred = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32", progress=False,
                                          weight_dtype=weight_dtype)
    pred.generate([list(range(3, 3 + PROMPT_LEN))], max_new_tokens=1)
    first_token = time.perf_counter()
    pred.generate([list(range(3, 3 + PROMPT_LEN))], max_new_tokens=new_tokens)
    c = pred.config
    kv_cache = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (PROMPT_LEN + new_tokens) * 4
    return dict(import_s=imported - start, load_to_first_token_s=first_token - imported,
                peak_rss_bytes=peak_memory("cpu"), weight_bytes=weight_bytes(pred.model), kv_cache_bytes=kv_cache)


class TransformersRunner:
    """transformers `generate`, greedy, exactly `new_tokens` tokens; a streamer clocks the first one."""

    def __init__(self, directory: Path):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer

        self.torch, self.threads = torch, torch.get_num_threads()
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

        class Clock(BaseStreamer):
            def __init__(self):
                self.times = []

            def put(self, value):  # first with the prompt, then with each new token
                self.times.append(time.perf_counter())

            def end(self):
                pass

        self.clock = Clock

    def time_generation(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        clock = self.clock()
        ids = self.torch.tensor(prompts)
        start = time.perf_counter()
        with self.torch.no_grad():
            self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
        end = time.perf_counter()
        return clock.times[1] - start, end - start


def best_of(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    return min(rounds, key=lambda r: r[1])


def decode_tps(timing: tuple[float, float], new_tokens: int, batch: int = 1) -> float:
    ttft, total = timing
    return batch * (new_tokens - 1) / (total - ttft)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each system's best is kept")
    parser.add_argument("--llama-gguf", default=None, help="GGUF for llama-bench, when a llama.cpp build is on PATH")
    parser.add_argument("--keep", default=None, help="build the checkpoints here and reuse them next time")
    parser.add_argument("--json", default=None, help="write every figure printed to this file")
    parser.add_argument("--measure-load", default=None, help=argparse.SUPPRESS)  # the fresh-process part
    parser.add_argument("--weight-dtype", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, args.new_tokens, args.weight_dtype)))
        return 0

    n_new = args.new_tokens
    with tempfile.TemporaryDirectory() as scratch:
        pt_dir, paddle_dir = build(Path(args.keep) if args.keep else Path(scratch))
        loads = {w: json.loads(subprocess.run(
            [sys.executable, __file__, "--measure-load", str(paddle_dir), "--new-tokens", str(n_new),
             "--weight-dtype", w], check=True, capture_output=True, text=True).stdout) for w in ("auto", "float32")}

        from ernie_paddle import ErniePredictor
        from ernie_paddle.bench import kernel_ceiling, matmul_ceiling, random_prompts, time_generation

        models = {w: ErniePredictor.from_pretrained(paddle_dir, device="cpu", dtype="float32", progress=False,
                                                    weight_dtype=w).model for w in ("auto", "float32")}
        reference = TransformersRunner(pt_dir)
        vocab = ARCHITECTURE["vocab_size"]
        one, long_prompt = random_prompts(vocab, 1, PROMPT_LEN), random_prompts(vocab, 1, args.prefill_len)
        batch = random_prompts(vocab, args.batch, PROMPT_LEN)
        systems = {**{w: (lambda p, k, m=m: time_generation(m, p, k)) for w, m in models.items()},
                   "transformers": reference.time_generation}
        for run in systems.values():
            run(one, 4)  # warm-up
        runs = {(name, kind): [] for name in systems for kind in ("decode", "prefill", "batch")}
        ceilings = {name: [] for name in ("paddle", "kernel auto", "kernel float32")}
        for _ in range(args.rounds):
            for name, run in systems.items():
                runs[name, "decode"].append(run(one, n_new))
                runs[name, "prefill"].append(run(long_prompt, 1))
                if name != "transformers":
                    runs[name, "batch"].append(run(batch, n_new))
                    ceilings[f"kernel {name}"].append(kernel_ceiling(models[name], "cpu"))
            ceilings["paddle"].append(matmul_ceiling(models["float32"], "cpu"))
        best = {key: best_of(value) for key, value in runs.items() if value}

    decode = {name: decode_tps(best[name, "decode"], n_new) for name in systems}
    prefill = {name: args.prefill_len / best[name, "prefill"][1] for name in systems}
    theirs = decode["transformers"]
    print(f"ERNIE-4.5-0.3B architecture, random weights, computing in float32, greedy; torch {reference.threads} "
          f"threads; best of {args.rounds} alternating rounds\n")
    labels = {"auto": "ernie-paddle, bf16 weights as stored", "float32": "ernie-paddle, float32 weight copies",
              "transformers": "transformers (float32)"}
    print(f"| system | decode b1, prompt {PROMPT_LEN}, {n_new} new (tok/s) | vs transformers | TTFT (s) "
          f"| prefill {args.prefill_len} (tok/s) | vs transformers | batch {args.batch} (tok/s) | vs batch 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in systems:
        batched = decode_tps(best[name, "batch"], n_new, args.batch) if name != "transformers" else None
        print(f"| {labels[name]} | {decode[name]:.2f} | {decode[name] / theirs:.2f}x | {best[name, 'decode'][0]:.3f} "
              f"| {prefill[name]:.1f} | {prefill[name] / prefill['transformers']:.2f}x | "
              + (f"{batched:.2f} | {batched / decode[name]:.2f}x |" if batched else "- | - |"))
    f32_bytes = loads["float32"]["weight_bytes"]
    paddle_ceiling = 1 / min(ceilings["paddle"])
    print(f"\nPaddle bare-matmul ceiling (float32 weights): {paddle_ceiling:.2f} tok/s "
          f"({f32_bytes * paddle_ceiling / 1e9:.1f} GB/s); float32 copies decode at "
          f"{decode['float32'] / paddle_ceiling:.0%} of it, bf16 weights at {decode['auto'] / paddle_ceiling:.0%}")
    for name in models:
        if None not in ceilings[f"kernel {name}"]:
            kernel = 1 / min(ceilings[f"kernel {name}"])
            print(f"CPU decoding kernel bare-matmul ceiling, {labels[name].split(', ')[1]}: {kernel:.2f} tok/s "
                  f"({loads[name]['weight_bytes'] * kernel / 1e9:.1f} GB/s); decode reaches {decode[name] / kernel:.0%}")
    for name, load in loads.items():
        limit = 1.3 * f32_bytes + load["kv_cache_bytes"]
        print(f"{labels[name]}: -Paddle bf16 checkpoint to first token {load['load_to_first_token_s']:.2f} s "
              f"(after {load['import_s']:.2f} s of imports); peak RSS of a {n_new}-token run "
              f"{load['peak_rss_bytes'] / 1e9:.2f} GB = {load['peak_rss_bytes'] / f32_bytes:.2f}x the float32 "
              f"weights (limit 1.3x + KV cache: {limit / 1e9:.2f} GB)")
    llama = llama_cpp(args.llama_gguf, n_new, args.prefill_len)
    print(llama)
    if args.json:
        kernels = {name: 1 / min(ceilings[f"kernel {name}"]) if None not in ceilings[f"kernel {name}"] else None
                   for name in models}
        report = dict(tool="bench_vs_transformers", architecture=ARCHITECTURE, prompt_len=PROMPT_LEN,
                      new_tokens=n_new, prefill_len=args.prefill_len, batch=args.batch, rounds=args.rounds,
                      torch_threads=reference.threads, paddle_ceiling_tps=paddle_ceiling, kernel_ceiling_tps=kernels,
                      loads=loads, llama_cpp=llama if args.llama_gguf else None, systems={
                          name: dict(label=labels[name], decode_tps=decode[name], ttft_s=best[name, "decode"][0],
                                     prefill_tps=prefill[name],
                                     batch_tps=decode_tps(best[name, "batch"], n_new, args.batch)
                                     if name != "transformers" else None) for name in systems})
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def llama_cpp(gguf: str | None, new_tokens: int, prefill_len: int) -> str:
    """llama.cpp's own benchmark on 2 threads, when a build and a GGUF of the model are at hand."""
    bench = shutil.which("llama-bench")
    if not bench or not gguf:
        return "llama.cpp: not run (" + ("no llama-bench on PATH" if not bench else "no --llama-gguf given") + ")"
    out = subprocess.run([bench, "-m", gguf, "-t", "2", "-n", str(new_tokens), "-p", str(prefill_len), "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    return "llama.cpp: " + ", ".join(f"{'tg' if r['n_gen'] else 'pp'}{r['n_gen'] or r['n_prompt']} "
                                     f"{r['avg_ts']:.1f} tok/s" for r in rows)


if __name__ == "__main__":
    sys.exit(main())
