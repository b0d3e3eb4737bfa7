"""Side-by-side CPU benchmark of the MoE model: ERNIE-4.5-21B-A3B layer shapes with fewer layers (the
whole model needs 43 GB in bf16), random weights saved bf16, float32 compute, greedy.

    python tools/bench_moe.py [--layers 4] [--new-tokens 128] [--reference-new-tokens 32] [--batch 8]
                              [--rounds 2] [--keep DIR] [--json OUT]

In one run, alternating the systems round by round (each round waits for an idle CPU first, and
every round is reported):
- ErniePredictor decoding the truncated MoE model at batch 1 (7-token prompt), and the GB/s at which
  it reads the weights a token is routed through (attention, top-k + shared experts, router, lm_head);
- ErniePredictor decoding the dense 0.3B architecture, and its GB/s: the MoE target is >= 70% of it;
- transformers' Ernie4_5_MoeForCausalLM `generate` on the same truncated checkpoint, float32;
- ErniePredictor at batch B, aggregate, and how many distinct experts a step read on average.
The 28-layer figure is the truncated model's bytes per token scaled to the full model's, read at the
GB/s measured here. Layer 0 is dense (intermediate 12288) and the others MoE, as in the real model.
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


def measure_load(directory: str, new_tokens: int, quantization: str | None = None) -> dict:
    """In a fresh process: load, generate `new_tokens`; the load time, peak RSS, held weights and KV cache."""
    from ernie_paddle import ErniePredictor
    from ernie_paddle.bench import peak_memory, weight_bytes

    start = time.perf_counter()
    pred = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32",
                                          **({"quantization": quantization} if quantization else {}))
    loaded = time.perf_counter()
    result = pred.generate([list(range(3, 3 + PROMPT_LEN))], max_new_tokens=new_tokens)[0]
    c = pred.config
    kv_cache = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (PROMPT_LEN + new_tokens) * 4
    return dict(load_s=loaded - start, peak_rss_bytes=peak_memory("cpu"), weight_bytes=weight_bytes(pred.model),
                kv_cache_bytes=kv_cache, decode_tps=result.generation_tps)


def fresh_process_load(directory: Path, new_tokens: int, quantization: str | None = None) -> dict:
    command = [sys.executable, __file__, "--measure-load", str(directory), "--new-tokens", str(new_tokens)]
    if quantization:
        command += ["--quantization", quantization]
    return json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout)  # progress on stderr


def ours(directory: Path):
    from ernie_paddle import ErniePredictor
    from ernie_paddle.bench import time_generation

    pred = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32", progress=True)
    return pred.model, lambda prompts, n: time_generation(pred.model, prompts, n)


def distinct_experts(model, prompts, new_tokens: int) -> float:
    """The number of distinct experts one decode step reads, on average over the MoE layers and steps."""
    from ernie_paddle.bench import time_generation
    from ernie_paddle.model import MoE

    counts = []
    layers = [layer.mlp for layer in model.ernie.layers if isinstance(layer.mlp, MoE)]
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
    try:
        time_generation(model, prompts, new_tokens)
    finally:
        for layer in layers:
            del layer.route
    return float(np.mean(counts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="layers of the truncated 21B-A3B shape (1 dense + MoE)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reference-new-tokens", type=int, default=32,
                        help="tokens transformers generates per round (its speed per token does not depend on it)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip transformers (it holds 4x the bytes)")
    parser.add_argument("--keep", default=None, help="write the checkpoints here and reuse them next time")
    parser.add_argument("--json", default=None, help="write every round's figures to this file")
    parser.add_argument("--full-wint4", default=None, metavar="DIR",
                        help="the stretch run: write the whole 28-layer 21B-A3B shape (44 GB of bf16) to DIR if "
                             "absent, load it as wint4 in a fresh process, decode, report peak RSS and tok/s")
    parser.add_argument("--measure-load", default=None, help=argparse.SUPPRESS)  # the fresh-process part
    parser.add_argument("--quantization", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, args.new_tokens, args.quantization)))
        return 0
    if args.full_wint4:
        return full_wint4(Path(args.full_wint4), args.new_tokens, args.json)

    moe_config = {**MOE_21B, "num_hidden_layers": args.layers, "moe_layer_end_index": args.layers - 1}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        moe_dir, dense_dir = root / f"moe-21b-a3b-{args.layers}layers-PT", root / "dense-0.3b-PT"
        if not moe_dir.exists():
            write_random_checkpoint(moe_dir, moe_config, "Ernie4_5_MoeForCausalLM", "ernie4_5_moe")
        if not dense_dir.exists():
            write_random_checkpoint(dense_dir, DENSE_03B, "Ernie4_5ForCausalLM", "ernie4_5")
        from ernie_paddle.bench import random_prompts, step_bytes, wait_for_idle_cpu, weight_bytes

        load = fresh_process_load(moe_dir, args.new_tokens)
        moe_model, moe_run = ours(moe_dir)
        dense_model, dense_run = ours(dense_dir)
        systems = {"moe": moe_run, "dense": dense_run}
        if not args.no_reference:
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_vs_transformers import TransformersRunner
            systems["transformers"] = TransformersRunner(moe_dir).time_generation
        one = random_prompts(MOE_21B["vocab_size"], 1, PROMPT_LEN)
        batch = random_prompts(MOE_21B["vocab_size"], args.batch, PROMPT_LEN, seed=1)
        for run in systems.values():
            run(one, 3)  # warm-up
        rounds = []
        for r in range(args.rounds):
            for name, run in systems.items():
                busy = wait_for_idle_cpu()
                n = args.reference_new_tokens if name == "transformers" else args.new_tokens
                ttft, total = run(one, n)
                rounds.append(dict(round=r, system=name, batch=1, new_tokens=n, ttft_s=ttft, total_s=total,
                                   decode_tps=(n - 1) / (total - ttft), cpu_busy_before=busy))
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
    print("| round | system | batch | new tokens | decode (tok/s) | weights read (GB/s) | CPU busy before |")
    print("|---|---|---|---|---|---|---|")
    for row in rounds:
        model = {"moe": moe_model, "dense": dense_model}.get(row["system"])
        gbps = step_bytes(model, batch=row["batch"]) * row["decode_tps"] / row["batch"] / 1e9 if model else None
        row["read_gbps"] = gbps
        print(f"| {row['round']} | {row['system']} | {row['batch']} | {row['new_tokens']} | {row['decode_tps']:.2f} "
              f"| {gbps:.1f} | {row['cpu_busy_before']:.0%} |" if gbps else
              f"| {row['round']} | {row['system']} | {row['batch']} | {row['new_tokens']} | {row['decode_tps']:.2f} "
              f"| - | {row['cpu_busy_before']:.0%} |")
    print()
    for r in range(args.rounds):
        this = {(x["system"], x["batch"]): x for x in rounds if x["round"] == r}
        moe1, dense1, moe_b = this["moe", 1], this["dense", 1], this["moe", args.batch]
        line = (f"round {r}: MoE reads at {moe1['read_gbps'] / dense1['read_gbps']:.0%} of the dense model's GB/s; "
                f"batch {args.batch} = {moe_b['decode_tps'] / moe1['decode_tps']:.2f}x batch 1; "
                f"28 layers at this GB/s: {moe1['read_gbps'] * 1e9 / full:.2f} tok/s")
        if ("transformers", 1) in this:
            line += f"; {moe1['decode_tps'] / this['transformers', 1]['decode_tps']:.2f}x transformers"
        print(line)
    print(f"distinct experts read per MoE layer and step: batch 1 {experts_b1:.2f}, batch {args.batch} "
          f"{experts_batch:.2f} (of {MOE_21B['moe_num_experts']}; top-{MOE_21B['moe_k']})")
    limit = 1.3 * load["weight_bytes"] + load["kv_cache_bytes"]
    print(f"fresh process: loaded in {load['load_s']:.1f} s; peak RSS of a {args.new_tokens}-token run "
          f"{load['peak_rss_bytes'] / 1e9:.2f} GB = {load['peak_rss_bytes'] / load['weight_bytes']:.2f}x the held "
          f"weights (limit 1.3x + KV cache: {limit / 1e9:.2f} GB)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(layers=args.layers, rounds=rounds, step_bytes=read, load=load,
                                                   step_bytes_28_layers=full, distinct_experts_b1=experts_b1,
                                                   distinct_experts_batch=experts_batch, batch=args.batch), indent=1))
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
    load = fresh_process_load(directory, new_tokens, "wint4")
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
