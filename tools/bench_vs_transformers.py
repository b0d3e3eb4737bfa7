"""Side-by-side CPU benchmark: ErniePredictor against transformers `generate`, float32, greedy, on the
full-size ERNIE-4.5-0.3B architecture with random weights (speed does not depend on weight values).

    python tools/bench_vs_transformers.py [--new-tokens 128] [--prefill-len 512] [--batch 8]
                                          [--rounds 2] [--keep DIR]

It writes the model as a bf16 -PT checkpoint with transformers, converts it to -Paddle, and then in
one run measures, alternating the two systems round by round and keeping each one's best round:
- decode at batch 1 (7-token prompt) and time to first token, both systems;
- bare matmul passes over the same weights, Paddle's and the CPU decoding kernel's: the decode
  ceilings, in tok/s;
- prefill of a long prompt, both systems;
- aggregate decode throughput of ErniePredictor at batch B against batch 1;
- loading the -Paddle bf16 checkpoint until the first token, and the peak resident memory of a
  128-token float32 run, in a fresh process that never imports torch.
With `--llama-gguf FILE` (an F32 GGUF of the same architecture) and `llama-bench` on PATH, llama.cpp's
tg/pp figures are printed too; ../shared/spec/anchors.md lists them for this machine kind.
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


def measure_load(directory: str, new_tokens: int) -> dict:
    """Run in a fresh process: import, load the checkpoint as float32, generate; times and peak RSS."""
    start = time.perf_counter()
    from ernie_paddle import ErniePredictor
    from ernie_paddle.bench import peak_memory, weight_bytes
    imported = time.perf_counter()
    pred = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32", progress=False)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each system's best is kept")
    parser.add_argument("--llama-gguf", default=None, help="GGUF for llama-bench, when a llama.cpp build is on PATH")
    parser.add_argument("--keep", default=None, help="build the checkpoints here and reuse them next time")
    parser.add_argument("--measure-load", default=None, help=argparse.SUPPRESS)  # the fresh-process part
    args = parser.parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, args.new_tokens)))
        return 0

    with tempfile.TemporaryDirectory() as scratch:
        pt_dir, paddle_dir = build(Path(args.keep) if args.keep else Path(scratch))
        load = json.loads(subprocess.run(
            [sys.executable, __file__, "--measure-load", str(paddle_dir), "--new-tokens", str(args.new_tokens)],
            check=True, capture_output=True, text=True).stdout)

        from ernie_paddle import ErniePredictor
        from ernie_paddle.bench import kernel_ceiling, matmul_ceiling, random_prompts, time_generation

        model = ErniePredictor.from_pretrained(paddle_dir, device="cpu", dtype="float32", progress=False).model
        reference = TransformersRunner(pt_dir)
        vocab, n = ARCHITECTURE["vocab_size"], args.new_tokens
        one, long_prompt = random_prompts(vocab, 1, PROMPT_LEN), random_prompts(vocab, 1, args.prefill_len)
        batch = random_prompts(vocab, args.batch, PROMPT_LEN)
        time_generation(model, one, 4)  # warm-up, both systems
        reference.time_generation(one, 4)
        runs = {key: [] for key in ("ours", "theirs", "ours_prefill", "theirs_prefill", "ours_batch")}
        ceilings, kernel_ceilings = [], []
        for _ in range(args.rounds):
            runs["ours"].append(time_generation(model, one, n))
            ceilings.append(matmul_ceiling(model, "cpu"))
            kernel_ceilings.append(kernel_ceiling(model, "cpu"))
            runs["theirs"].append(reference.time_generation(one, n))
            runs["ours_prefill"].append(time_generation(model, long_prompt, 1))
            runs["theirs_prefill"].append(reference.time_generation(long_prompt, 1))
            runs["ours_batch"].append(time_generation(model, batch, n))
        best = {key: best_of(value) for key, value in runs.items()}

    ours, theirs = decode_tps(best["ours"], n), decode_tps(best["theirs"], n)
    ceiling = 1 / min(ceilings)
    prefill_ours = args.prefill_len / best["ours_prefill"][1]
    prefill_theirs = args.prefill_len / best["theirs_prefill"][1]
    batched = decode_tps(best["ours_batch"], n, args.batch)
    limit = 1.3 * load["weight_bytes"] + load["kv_cache_bytes"]
    print(f"ERNIE-4.5-0.3B architecture, random weights, float32, greedy; torch {reference.threads} "
          f"threads; best of {args.rounds} alternating rounds\n")
    print("| measure | ernie-paddle | transformers | ratio |\n|---|---|---|---|")
    print(f"| decode, batch 1, prompt {PROMPT_LEN}, {n} new (tok/s) | {ours:.2f} | {theirs:.2f} "
          f"| {ours / theirs:.2f}x |")
    print(f"| latency for those {n} tokens (s) | {best['ours'][1]:.2f} | {best['theirs'][1]:.2f} "
          f"| {best['theirs'][1] / best['ours'][1]:.2f}x |")
    print(f"| time to first token, prompt {PROMPT_LEN} (s) | {best['ours'][0]:.3f} | {best['theirs'][0]:.3f} "
          f"| {best['theirs'][0] / best['ours'][0]:.2f}x |")
    print(f"| prefill, {args.prefill_len}-token prompt (tok/s) | {prefill_ours:.1f} | {prefill_theirs:.1f} "
          f"| {prefill_ours / prefill_theirs:.2f}x |")
    print(f"\nPaddle bare-matmul ceiling: {ceiling:.2f} tok/s ({load['weight_bytes'] * ceiling / 1e9:.1f} GB/s); "
          f"decode reaches {ours / ceiling:.0%} of it")
    if None not in kernel_ceilings:
        kernel = 1 / min(kernel_ceilings)
        print(f"CPU decoding kernel bare-matmul ceiling: {kernel:.2f} tok/s "
              f"({load['weight_bytes'] * kernel / 1e9:.1f} GB/s); decode reaches {ours / kernel:.0%} of it")
    print(f"batch {args.batch}: {batched:.2f} tok/s aggregate decode, {batched / ours:.2f}x batch 1")
    print(f"-Paddle bf16 checkpoint to first token: {load['load_to_first_token_s']:.2f} s "
          f"(after {load['import_s']:.2f} s of imports)")
    print(f"peak RSS of a {n}-token float32 run: {load['peak_rss_bytes'] / 1e9:.2f} GB = "
          f"{load['peak_rss_bytes'] / load['weight_bytes']:.2f}x the float32 weights "
          f"(limit 1.3x + KV cache: {limit / 1e9:.2f} GB)")
    print(llama_cpp(args.llama_gguf, args.new_tokens, args.prefill_len))
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
