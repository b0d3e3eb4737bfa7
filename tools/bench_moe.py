"""Side-by-side CPU benchmark of the MoE model: ERNIE-4.5-21B-A3B layer shapes with fewer layers (the
whole model needs 43 GB in bf16), random weights saved bf16, float32 compute, greedy.

    python tools/bench_moe.py [--layers 4] [--new-tokens 128] [--batch 8] [--rounds 2] [--no-reference]
                              [--keep DIR] [--json OUT]
    python tools/bench_moe.py --llamacpp [--layers 4] [--rounds 3] [--threads 2] [--gguf-dir DIR] [--keep DIR]
                              [--json OUT]
    python tools/bench_moe.py --full-wint4 DIR [--new-tokens 32] [--json OUT]

Every timed part waits for an idle CPU first, and every round is reported. The default run:
- transformers' Ernie4_5_MoeForCausalLM `generate` (float32) against ErniePredictor, each round of
  each side in its own fresh process that loads its model (transformers' float32 copy is twice our
  bf16 weights: the two need not fit in memory together), alternating; the ratio per pair of rounds;
- then in this process, alternating round by round: ErniePredictor decoding the truncated MoE model at
  batch 1 (7-token prompt), and the GB/s at which it reads the weights a token is routed through
  (attention, top-k + shared experts, router, lm_head); the dense 0.3B architecture, and its GB/s (the
  MoE target is >= 70% of it); the MoE model at batch B, aggregate, and how many distinct experts a
  step read on average.
The 28-layer figure is the truncated model's bytes per token scaled to the full model's, read at the
GB/s measured here. Layer 0 is dense (intermediate 12288) and the others MoE, as in the real model.

--llamacpp: llama.cpp's llama-bench tg128 on BF16 / Q8_0 / Q4_0 GGUFs of the same MoE checkpoint
(built and converted by tools/bench_vs_llamacpp.py's functions) against ErniePredictor bf16 / wint8 /
wint4, each of ours in a fresh process, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MOE_21B = dict(vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
               num_attention_heads=20, num_key_value_heads=4, head_dim=128, rope_theta=500000.0,
               tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5, use_bias=False,
               moe_num_experts=64, moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2,
               moe_layer_start_index=1, moe_layer_end_index=27, moe_layer_interval=1, moe_norm_min=1e-12)
DENSE_03B = dict(vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
                 num_attention_heads=16, num_key_value_heads=2, head_dim=128, rope_theta=500000.0,
                 tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5, use_bias=False)
PROMPT_LEN = 7


def random_bf16(rng, shape, std: float = 0.02) -> np.ndarray:
    """Normal values rounded to bf16, as uint16 bits (the checkpoint module's bf16 storage)."""
    bits = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def pt_tensors(config: dict) -> list[tuple[str, tuple]]:
    """The -PT tensor names and shapes of a dense or MoE ERNIE 4.5 config."""
    h, d = config["hidden_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (config["vocab_size"], h)), ("model.norm.weight", (h,))]
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        out += [(f"{layer}.input_layernorm.weight", (h,)), (f"{layer}.post_attention_layernorm.weight", (h,)),
                (f"{layer}.self_attn.q_proj.weight", (q, h)), (f"{layer}.self_attn.k_proj.weight", (kv, h)),
                (f"{layer}.self_attn.v_proj.weight", (kv, h)), (f"{layer}.self_attn.o_proj.weight", (h, q))]
        moe = "moe_num_experts" in config and config["moe_layer_start_index"] <= i <= config["moe_layer_end_index"]
        mlps = [(f"{layer}.mlp", config["intermediate_size"])]
        if moe:
            size = config["moe_intermediate_size"]
            out += [(f"{layer}.mlp.gate.weight", (config["moe_num_experts"], h)),
                    (f"{layer}.mlp.moe_statics.e_score_correction_bias", (1, config["moe_num_experts"]))]
            mlps = [(f"{layer}.mlp.experts.{e}", size) for e in range(config["moe_num_experts"])]
            if config["moe_num_shared_experts"]:
                mlps.append((f"{layer}.mlp.shared_experts", size * config["moe_num_shared_experts"]))
        for prefix, size in mlps:
            out += [(f"{prefix}.gate_proj.weight", (size, h)), (f"{prefix}.up_proj.weight", (size, h)),
                    (f"{prefix}.down_proj.weight", (h, size))]
    return out


def write_random_checkpoint(directory: Path, config: dict, architecture: str, model_type: str, seed: int = 0,
                            pool: int = 0):
    """A bf16 -PT checkpoint of random weights, written one tensor at a time (norms 1, router float32).
    With `pool`, the matrices of each shape are drawn from `pool` random ones: the disk, not the random
    numbers, then sets the pace (for the 44 GB full model; speed does not depend on the values)."""
    from ernie_paddle.checkpoint import write_safetensors

    rng = np.random.default_rng(seed)
    drawn: dict[tuple, list] = {}

    def random_matrix(shape):
        if not pool:
            return random_bf16(rng, shape)
        arrays = drawn.setdefault(shape, [])
        if len(arrays) < pool:
            arrays.append(random_bf16(rng, shape))
            return arrays[-1]
        return arrays[rng.integers(pool)]

    entries = []
    for name, shape in pt_tensors(config):
        if name.endswith("norm.weight"):
            entries.append((name, "bfloat16", shape, lambda s=shape: np.full(s, 0x3F80, np.uint16)))
        elif ".mlp.gate." in name or "e_score_correction_bias" in name:
            entries.append((name, "float32", shape, lambda s=shape: rng.standard_normal(s, dtype=np.float32) * 0.02))
        else:
            entries.append((name, "bfloat16", shape, lambda s=shape: random_matrix(s)))
    directory.mkdir(parents=True)
    total = sum(int(np.prod(s)) * (4 if dtype == "float32" else 2) for _, dtype, s, _ in entries)
    print(f"writing {total / 1e9:.1f} GB of random weights to {directory} ...", file=sys.stderr)
    write_safetensors(directory / "model.safetensors", entries, {"format": "pt"})
    (directory / "config.json").write_text(json.dumps(
        {"architectures": [architecture], "model_type": model_type, "torch_dtype": "bfloat16", **config}, indent=1))


def decode_round(system: str, directory: str, prompt: list[int], new_tokens: int,
                 quantization: str | None = None) -> dict:
    """One round in this fresh process: load `system`'s model ("ernie-paddle" or "transformers") from
    `directory`, warm up, say "ready" and wait for a line on stdin (the parent waits for an idle CPU),
    then time a batch-1 greedy decode of `new_tokens`. Also the load time, held weights and peak RSS.
    transformers' process never imports ernie_paddle, whose malloc and MKL settings would be its too."""
    start = time.perf_counter()
    if system == "transformers":
        # its loader's threads widen and stack several MoE layers' experts at once: 4 layers (11 GB of
        # float32) went beyond 24 GB; one layer at a time it peaks about 4 GB above the weights
        os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_vs_transformers import TransformersRunner

        runner = TransformersRunner(Path(directory))
        run, held, kv_cache = runner.time_generation, sum(p.nbytes for p in runner.model.parameters()), None
    else:
        from ernie_paddle import ErniePredictor
        from ernie_paddle.bench import time_generation, weight_bytes

        pred = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32",
                                              **({"quantization": quantization} if quantization else {}))
        c = pred.config
        run, held = (lambda prompts, n: time_generation(pred.model, prompts, n)), weight_bytes(pred.model)
        kv_cache = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (PROMPT_LEN + new_tokens) * 4
    load_s = time.perf_counter() - start
    run([prompt], 3)  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    ttft, total = run([prompt], new_tokens)
    return dict(system=system, quantization=quantization, batch=1, new_tokens=new_tokens, ttft_s=ttft,
                total_s=total, decode_tps=(new_tokens - 1) / (total - ttft), load_s=load_s, weight_bytes=held,
                kv_cache_bytes=kv_cache, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def fresh_process_round(system: str, directory: Path, new_tokens: int, quantization: str | None = None) -> dict:
    """decode_round in a subprocess, which alone holds its model and frees it all when it ends; the timed
    part starts once the CPU is idle."""
    from ernie_paddle.bench import random_prompts, wait_for_idle_cpu

    prompt = random_prompts(json.loads((directory / "config.json").read_text())["vocab_size"], 1, PROMPT_LEN)[0]
    command = [sys.executable, __file__, "--decode-round", system, str(directory), "--new-tokens", str(new_tokens),
               "--prompt", ",".join(map(str, prompt))] + (["--quantization", quantization] if quantization else [])
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:  # progress on stderr
        while (line := child.stdout.readline()) and line.strip() != "ready":
            pass
        if line:  # else it ended before it was ready
            busy = wait_for_idle_cpu()
            child.stdin.write("go\n")
            child.stdin.flush()
            out = child.stdout.read()
    if child.returncode != 0 or not line:
        raise SystemExit(f"the {system} round on {directory} failed (exit {child.returncode}); its error is above")
    return dict(json.loads(out.splitlines()[-1]), cpu_busy_before=busy)


def ours(directory: Path):
    from ernie_paddle import ErniePredictor
    from ernie_paddle.bench import time_generation

    pred = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32", progress=True)
    return pred.model, lambda prompts, n: time_generation(pred.model, prompts, n)


def distinct_experts(model, prompts, new_tokens: int) -> float:
    """The number of distinct experts one decode step reads, on average over the MoE layers and steps:
    decoded through the layers' separate operators, whose MoE.route is the router of the decoder operator."""
    from ernie_paddle import model as model_module
    from ernie_paddle.bench import time_generation

    counts = []
    layers = [layer.mlp for layer in model.ernie.layers if isinstance(layer.mlp, model_module.MoE)]
    originals = [layer.route for layer in layers]

    def recording(route):
        def run(h):
            chosen, weights = route(h)
            if h.shape[0] == len(prompts):  # a decode step, not the prompt
                counts.append(len(np.unique(chosen.numpy())))
            return chosen, weights
        return run

    for layer, route in zip(layers, originals):
        layer.route = recording(route)
    decoder_on_cpu, model_module.decoder_on_cpu = model_module.decoder_on_cpu, lambda *a: False
    try:
        time_generation(model, prompts, new_tokens)
    finally:
        model_module.decoder_on_cpu = decoder_on_cpu
        for layer in layers:
            del layer.route
    return float(np.mean(counts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="layers of the truncated 21B-A3B shape (1 dense + MoE)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip the transformers rounds")
    parser.add_argument("--llamacpp", action="store_true",
                        help="instead: llama.cpp's llama-bench on BF16 / Q8_0 / Q4_0 GGUFs of the MoE checkpoint "
                             "against ernie-paddle bf16 / wint8 / wint4, alternating rounds")
    parser.add_argument("--threads", type=int, default=2, help="llama-bench's threads (with --llamacpp)")
    parser.add_argument("--gguf-dir", default=None, help="with --llamacpp: where the GGUFs are (or are written); "
                                                         "default: beside llama.cpp's build")
    parser.add_argument("--keep", default=None, help="write the checkpoints here and reuse them next time")
    parser.add_argument("--json", default=None, help="write every round's figures to this file")
    parser.add_argument("--full-wint4", default=None, metavar="DIR",
                        help="the stretch run: write the whole 28-layer 21B-A3B shape (44 GB of bf16) to DIR if "
                             "absent, load it as wint4 in a fresh process, decode, report peak RSS and tok/s")
    parser.add_argument("--decode-round", nargs=2, default=None, help=argparse.SUPPRESS)  # SYSTEM DIR, in a subprocess
    parser.add_argument("--prompt", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quantization", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.decode_round:
        system, directory = args.decode_round
        prompt = [int(t) for t in args.prompt.split(",")]
        print(json.dumps(decode_round(system, directory, prompt, args.new_tokens, args.quantization)))
        return 0
    if args.full_wint4:
        return full_wint4(Path(args.full_wint4), args.new_tokens, args.json)

    moe_config = {**MOE_21B, "num_hidden_layers": args.layers, "moe_layer_end_index": args.layers - 1}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        moe_dir, dense_dir = root / f"moe-21b-a3b-{args.layers}layers-PT", root / "dense-0.3b-PT"
        if not moe_dir.exists():
            write_random_checkpoint(moe_dir, moe_config, "Ernie4_5_MoeForCausalLM", "ernie4_5_moe")
        if args.llamacpp:
            return against_llamacpp(moe_dir, args.gguf_dir, args.rounds, args.new_tokens, args.threads, args.json)
        if not dense_dir.exists():
            write_random_checkpoint(dense_dir, DENSE_03B, "Ernie4_5ForCausalLM", "ernie4_5")
        from ernie_paddle.bench import random_prompts, step_bytes, wait_for_idle_cpu, weight_bytes

        # transformers' float32 copy is 2x our bf16 weights: each side runs in its own fresh process, one
        # at a time, so that the two never need to fit in memory together
        rounds, pairs = [], []
        for r in range(0 if args.no_reference else args.rounds):
            pair = {}
            for system in ("ernie-paddle", "transformers"):
                pair[system] = fresh_process_round(system, moe_dir, args.new_tokens)
                rounds.append(dict(pair[system], round=r, system="moe" if system == "ernie-paddle" else system,
                                   fresh_process=True))
                print(f"round {r}, fresh process: {system} {pair[system]['decode_tps']:.2f} tok/s, peak RSS "
                      f"{pair[system]['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
            pairs.append(dict(round=r, ernie_paddle_tps=pair["ernie-paddle"]["decode_tps"],
                              transformers_tps=pair["transformers"]["decode_tps"],
                              ratio=pair["ernie-paddle"]["decode_tps"] / pair["transformers"]["decode_tps"]))
        load = rounds[0] if rounds else fresh_process_round("ernie-paddle", moe_dir, args.new_tokens)

        moe_model, moe_run = ours(moe_dir)
        dense_model, dense_run = ours(dense_dir)
        systems = {"moe": moe_run, "dense": dense_run}
        one = random_prompts(MOE_21B["vocab_size"], 1, PROMPT_LEN)
        batch = random_prompts(MOE_21B["vocab_size"], args.batch, PROMPT_LEN, seed=1)
        for run in systems.values():
            run(one, 3)  # warm-up
        for r in range(args.rounds):
            for name, run in systems.items():
                busy = wait_for_idle_cpu()
                ttft, total = run(one, args.new_tokens)
                rounds.append(dict(round=r, system=name, batch=1, new_tokens=args.new_tokens, ttft_s=ttft,
                                   total_s=total, decode_tps=(args.new_tokens - 1) / (total - ttft),
                                   cpu_busy_before=busy))
            busy = wait_for_idle_cpu()
            ttft, total = moe_run(batch, args.new_tokens)
            rounds.append(dict(round=r, system="moe", batch=args.batch, new_tokens=args.new_tokens, ttft_s=ttft,
                               total_s=total, decode_tps=args.batch * (args.new_tokens - 1) / (total - ttft),
                               cpu_busy_before=busy))
        experts_b1 = distinct_experts(moe_model, one, 16)
        experts_batch = distinct_experts(moe_model, batch, 16)

    read = {"moe": step_bytes(moe_model), "dense": step_bytes(dense_model)}
    full = step_bytes_full(moe_model)
    print(f"ERNIE-4.5-21B-A3B shapes, {args.layers} layers (layer 0 dense), random bf16 weights, float32 compute, "
          f"greedy, prompt {PROMPT_LEN}; held {weight_bytes(moe_model) / 1e9:.2f} GB, read per token "
          f"{read['moe'] / 1e9:.3f} GB (28 layers: {full / 1e9:.2f} GB)\n")
    print("| round | system | process | batch | new tokens | decode (tok/s) | weights read (GB/s) | CPU busy before |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rounds:
        model = {"moe": moe_model, "dense": dense_model}.get(row["system"])
        row["read_gbps"] = step_bytes(model, batch=row["batch"]) * row["decode_tps"] / row["batch"] / 1e9 if model \
            else None
        gbps = f"{row['read_gbps']:.1f}" if model else "-"
        print(f"| {row['round']} | {row['system']} | {'fresh' if row.get('fresh_process') else 'shared'} | "
              f"{row['batch']} | {row['new_tokens']} | {row['decode_tps']:.2f} | {gbps} | {row['cpu_busy_before']:.0%} |")
    print()
    for pair in pairs:
        print(f"round {pair['round']}, fresh processes: ernie-paddle {pair['ernie_paddle_tps']:.2f} tok/s, "
              f"transformers {pair['transformers_tps']:.2f} tok/s: {pair['ratio']:.2f}x transformers")
    for r in range(args.rounds):
        this = {(x["system"], x["batch"]): x for x in rounds if x["round"] == r and not x.get("fresh_process")}
        moe1, dense1, moe_b = this["moe", 1], this["dense", 1], this["moe", args.batch]
        print(f"round {r}: MoE reads at {moe1['read_gbps'] / dense1['read_gbps']:.0%} of the dense model's GB/s; "
              f"batch {args.batch} = {moe_b['decode_tps'] / moe1['decode_tps']:.2f}x batch 1; "
              f"28 layers at this GB/s: {moe1['read_gbps'] * 1e9 / full:.2f} tok/s")
    print(f"distinct experts read per MoE layer and step: batch 1 {experts_b1:.2f}, batch {args.batch} "
          f"{experts_batch:.2f} (of {MOE_21B['moe_num_experts']}; top-{MOE_21B['moe_k']})")
    limit = 1.3 * load["weight_bytes"] + load["kv_cache_bytes"]
    print(f"fresh process: loaded in {load['load_s']:.1f} s; peak RSS of a {args.new_tokens}-token run "
          f"{load['peak_rss_bytes'] / 1e9:.2f} GB = {load['peak_rss_bytes'] / load['weight_bytes']:.2f}x the held "
          f"weights (limit 1.3x + KV cache: {limit / 1e9:.2f} GB)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(layers=args.layers, rounds=rounds, reference_pairs=pairs,
                                                   step_bytes=read, load=load, step_bytes_28_layers=full,
                                                   distinct_experts_b1=experts_b1,
                                                   distinct_experts_batch=experts_batch, batch=args.batch), indent=1))
    return 0


def against_llamacpp(moe_dir: Path, gguf_dir: str | None, rounds: int, new_tokens: int, threads: int,
                     json_out: str | None) -> int:
    """llama-bench tg`new_tokens` on the checkpoint's BF16 / Q8_0 / Q4_0 GGUFs (tools/bench_vs_llamacpp.py
    builds llama.cpp and converts) against our bf16 / wint8 / wint4 decode, alternating round by round;
    ours each in a fresh process, as llama-bench loads its model each time."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_vs_llamacpp as llamacpp
    from ernie_paddle.bench import wait_for_idle_cpu

    root = llamacpp.cache_root()
    source, binaries = llamacpp.build_llama_cpp(root)
    for name in llamacpp.TOKENIZER_FILES:  # the converter reads a SentencePiece tokenizer; our loader ignores it
        if not (moe_dir / name).exists():
            shutil.copy(llamacpp.DEMO / name, moe_dir / name)
    out = Path(gguf_dir) if gguf_dir else root / "gguf" / moe_dir.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    size = {"BF16": 1.0, "Q8_0": 8.5 / 16, "Q4_0": 4.5 / 16}  # of the bf16 checkpoint's bytes
    need = sum(f * (moe_dir / "model.safetensors").stat().st_size for kind, f in size.items()
               if not any(out.glob(f"*-{kind.lower()}.gguf")))
    if need and shutil.disk_usage(out).free < need + 2e9:
        print(f"{out}: {shutil.disk_usage(out).free / 1e9:.1f} GB free, the GGUFs need {need / 1e9:.1f} GB "
              "and 2 GB to spare; free some disk or use fewer --layers", file=sys.stderr)
        return 2
    try:
        files = llamacpp.ggufs(moe_dir, source, binaries, out)
    except subprocess.CalledProcessError as failed:
        print(f"{' '.join(map(str, failed.cmd[:3]))} ... failed on {moe_dir}:\n"
              f"{failed.stderr.decode(errors='replace')[-3000:]}", file=sys.stderr)
        return 1

    results = {kind: {"llama.cpp": [], "ernie-paddle": [], "cpu_busy_before": []} for kind, _ in llamacpp.PAIRS}
    for r in range(rounds):
        for kind, quantization in llamacpp.PAIRS:
            busy = wait_for_idle_cpu()
            theirs = llamacpp.llama_bench(binaries, files[kind], threads, new_tokens)
            mine = fresh_process_round("ernie-paddle", moe_dir, new_tokens, quantization)
            results[kind]["llama.cpp"].append(theirs)
            results[kind]["ernie-paddle"].append(mine["decode_tps"])
            results[kind]["cpu_busy_before"].append([busy, mine["cpu_busy_before"]])
            print(f"round {r}: {kind} llama.cpp {theirs:.2f}, ernie-paddle {quantization or 'bf16'} "
                  f"{mine['decode_tps']:.2f} tok/s: {mine['decode_tps'] / theirs:.2f}x (CPU busy before "
                  f"{busy:.0%} / {mine['cpu_busy_before']:.0%}; our peak RSS {mine['peak_rss_bytes'] / 1e9:.2f} GB)")

    layers = json.loads((moe_dir / "config.json").read_text())["num_hidden_layers"]
    print(f"\nERNIE-4.5-21B-A3B shapes, {layers} layers, random weights, batch 1, {PROMPT_LEN}-token prompt, "
          f"{new_tokens} new tokens; llama-bench -t {threads} -p 0 -n {new_tokens}; best of {rounds} rounds\n")
    print("| weights | llama.cpp (tok/s) | ernie-paddle (tok/s) | ratio | ratio per round |")
    print("|---|---|---|---|---|")
    summary = {}
    for kind, quantization in llamacpp.PAIRS:
        rows = results[kind]
        ratios = [m / t for m, t in zip(rows["ernie-paddle"], rows["llama.cpp"])]
        theirs, mine = max(rows["llama.cpp"]), max(rows["ernie-paddle"])
        summary[kind] = dict(quantization=quantization or "bf16", llama_cpp_tps=theirs, ernie_paddle_tps=mine,
                             ratio=mine / theirs, round_ratios=ratios, rounds=rows, gguf_bytes=files[kind].stat().st_size)
        print(f"| {kind} / {quantization or 'bf16'} | {theirs:.2f} | {mine:.2f} | {mine / theirs:.2f}x | "
              f"{', '.join(f'{x:.2f}x' for x in ratios)} |")
    if json_out:
        Path(json_out).write_text(json.dumps(dict(model=f"ERNIE-4.5-21B-A3B shapes, {layers} layers",
                                                  new_tokens=new_tokens, threads=threads,
                                                  llama_cpp_python=llamacpp.LLAMA_CPP_PYTHON, results=summary),
                                             indent=1))
    return 0


def full_wint4(directory: Path, new_tokens: int, json_out: str | None) -> int:
    """The whole 21B-A3B shape from a bf16 checkpoint, quantized to wint4 as it loads."""
    if not directory.exists():
        need = 44e9 * 1.05
        free = shutil.disk_usage(directory.parent).free
        if free < need:
            print(f"{directory.parent}: {free / 1e9:.0f} GB free, the checkpoint needs {need / 1e9:.0f} GB", file=sys.stderr)
            return 2
        write_random_checkpoint(directory, MOE_21B, "Ernie4_5_MoeForCausalLM", "ernie4_5_moe", pool=8)
    load = fresh_process_round("ernie-paddle", directory, new_tokens, "wint4")
    print(f"ERNIE-4.5-21B-A3B shape, 28 layers, bf16 checkpoint loaded as wint4: {load['load_s']:.0f} s to load, "
          f"held {load['weight_bytes'] / 1e9:.2f} GB, peak RSS {load['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({load['peak_rss_bytes'] / 2**30:.2f} GiB), decode {load['decode_tps']:.2f} tok/s ({new_tokens} tokens)")
    if json_out:
        Path(json_out).write_text(json.dumps(dict(full_wint4=load), indent=1))
    return 0


def step_bytes_full(model) -> int:
    """step_bytes of the 28-layer model: the truncated model's, with its last (MoE) layer repeated."""
    from ernie_paddle.bench import step_bytes

    layers = model.ernie.layers
    return step_bytes(model) + (MOE_21B["num_hidden_layers"] - len(layers)) * step_bytes(model, layers[-1].parameters())


if __name__ == "__main__":
    sys.exit(main())
