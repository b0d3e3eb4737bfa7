"""Latency / throughput / TPOT of greedy generation, for a grid of prompt and output lengths.

Prompts are random token ids, and every run generates exactly its output length (an end-of-text
token does not stop it). Decoding reads every weight once per step (of a MoE layer, the experts a
token is routed to), so the achieved weight bandwidth is those bytes / TPOT; `matmul_ceiling`
measures what bare matmuls allow over the same weights, one call per matrix: the decoding kernel's
over the model's, Paddle's (on CPU over copies in its faster layout).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import numpy.random  # loaded lazily otherwise, on the first prompt: a Ctrl-C landing in that import was lost

from . import device as devices, quant
from .errors import ErnieError
from .generate import GenerationSettings, decode_steps
from .model import Packed

paddle = devices.import_paddle()


@dataclass
class BenchRow:
    input_len: int
    output_len: int
    batch: int
    latency_s: float            # prompt in, last token out
    throughput_tps: float       # generated tokens (all rows) per second of latency
    tpot_s: float               # time per output token after the first
    ttft_s: float               # time to first token (prefill and one sample)
    prefill_tps: float          # prompt tokens (all rows) per second of TTFT
    bandwidth_gbps: float       # weight bytes read per decode step / TPOT


def weight_bytes(model) -> int:
    """Bytes of every weight the model holds."""
    return sum(int(np.prod(p.shape)) * p.element_size() for p in model.parameters())


def step_bytes(model, parameters=None, batch: int = 1) -> int:
    """Weight bytes a decode step of `batch` rows reads (of `parameters`, by default all): every matrix,
    but of a MoE layer's stacked experts only those the rows are routed to (at batch 1 top_k; at batch B,
    for independent uniform routing, E (1 - (1 - k/E)^B) of the E), and of an untied embedding one row."""
    moe = model.config.moe
    embedding = model.ernie.embed_tokens
    lookup_only = set() if model.lm_head is None else \
        {id(p) for p in (embedding.parameters() if isinstance(embedding, Packed) else [embedding])}
    total = 0
    for p in model.parameters() if parameters is None else parameters:
        nbytes = int(np.prod(p.shape)) * p.element_size()
        if len(p.shape) == 3:
            nbytes = int(nbytes * (1 - (1 - moe.top_k / moe.num_experts) ** batch))
        elif id(p) in lookup_only:
            nbytes = nbytes // p.shape[0]
        total += nbytes
    return total


def peak_memory(device: str) -> int | None:
    """Peak device memory in bytes; on CPU the process's peak resident set (VmHWM)."""
    if device != "cpu":
        return devices.peak_memory(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def random_prompts(vocab_size: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, size=(batch, length)).tolist()


def time_generation(model, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(seconds to the first token, seconds to the last) of a greedy run of exactly `output_len` tokens."""
    start = time.perf_counter()
    first = None
    for _ in decode_steps(model, prompts, GenerationSettings(max_new_tokens=output_len)):
        first = first or time.perf_counter()  # each yielded token is on the host: the device is done
    return first - start, time.perf_counter() - start


def measure(model, input_len: int, output_len: int, batch: int = 1, repeat: int = 1) -> BenchRow:
    """One table row: the fastest of `repeat` runs (the least disturbed by other work)."""
    prompts = random_prompts(model.config.vocab_size, batch, input_len)
    ttft, latency = min((time_generation(model, prompts, output_len) for _ in range(repeat)), key=lambda r: r[1])
    tpot = (latency - ttft) / (output_len - 1) if output_len > 1 else 0.0
    return BenchRow(input_len, output_len, batch, latency, batch * output_len / latency, tpot, ttft,
                    batch * input_len / ttft, step_bytes(model, batch=batch) / tpot / 1e9 if tpot else 0.0)


def wait_for_idle_cpu(limit: float = 0.25, timeout: float = 120.0) -> float:
    """Wait until the machine's CPU use over a second is below `limit`; returns the last figure."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]
    deadline = time.monotonic() + timeout
    while True:
        total0, idle0 = sample()
        time.sleep(1.0)
        total1, idle1 = sample()
        busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
        if busy < limit or time.monotonic() > deadline:
            return busy


def matmul_ceiling(model, device: str, repeat: int = 5, kernel: bool = False) -> float | None:
    """Seconds for one batch-1 pass of bare matmuls, one call per weight matrix (the tied embedding as
    the lm_head; of a MoE layer's experts, the first top_k): the bound for a decode step. With `kernel`,
    the CPU decoding kernel's over the weights as the model holds them ([out, in]). Else `paddle.matmul`'s; on CPU over the -Paddle layout ([in,
    out]), which it reads 1.3x as fast as [out, in]: the pass runs over transposed copies made here (the
    weights' bytes again, freed after). The fastest of `repeat` passes. None for Paddle's when the
    weights are held in another dtype than the computation's (Paddle has no CPU matmul of float32 by
    bfloat16)."""
    from . import cpu_ops
    if not kernel and model.weight_dtype != model.dtype_name:
        return None
    embedding = model.ernie.embed_tokens
    transposed = functools.partial(paddle.matmul, transpose_y=True)
    rows = {}  # one input row per inner size

    def product(w):  # (matmul, the weight it reads, the input row) for one pass
        x = rows.setdefault(w.shape[1], paddle.randn([1, w.shape[1]]).astype(model.dtype_name))
        if isinstance(w, Packed):
            return lambda x, w: cpu_ops.quant_matmul(x, w.data, w.scales), w, x
        if kernel:
            return cpu_ops.matmul, w, x
        if w is embedding or device != "cpu":
            return transposed, w, x
        return paddle.matmul, w.t().contiguous(), x

    def experts_product(w):  # one row through each of the first top_k experts, as decoding reads them
        k = model.config.moe.top_k
        x = paddle.randn([k, w.shape[2]]).astype(model.dtype_name)
        offsets = paddle.to_tensor(np.minimum(np.arange(w.shape[0] + 1), k).astype(np.int64))
        if isinstance(w, Packed):
            return lambda x, w: cpu_ops.grouped_quant_matmul(x, w.data, w.scales, offsets), w, x
        if kernel:
            return functools.partial(cpu_ops.grouped_matmul, offsets=offsets), w, x
        return lambda x, w: [transposed(x[e:e + 1], w[e]) for e in range(k)], w, x

    matrices = {id(w): w for w, _ in model.load_targets().values() if len(w.shape) >= 2}.values()
    products = [experts_product(w) if len(w.shape) == 3 else product(w) for w in matrices
                if w is not embedding or model.lm_head is None]

    def one_pass():
        for matmul, w, x in products:
            matmul(x, w)
        devices.synchronize(device)

    one_pass()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - start)
    return best


def kernel_ceiling(model, device: str) -> float | None:
    """matmul_ceiling of the CPU decoding kernel, where decoding uses it; else None."""
    from . import cpu_ops
    if device != "cpu" or model.dtype_name != "float32" or not cpu_ops.available():
        return None
    return matmul_ceiling(model, device, kernel=True)


def run(model, device: str, input_lens, output_lens, batch: int = 1, warmup: int = 1,
        repeat: int = 1, measured: Callable[[BenchRow], None] = lambda row: None) -> list[BenchRow]:
    """The rows of the table, each handed to `measured` as soon as it is measured."""
    for _ in range(warmup):
        time_generation(model, random_prompts(model.config.vocab_size, batch, min(input_lens)), 4)
    rows = []
    for i in input_lens:
        for o in output_lens:
            rows.append(measure(model, i, o, batch, repeat))
            measured(rows[-1])
    return rows


TABLE_HEAD = ("| input | output | batch | latency (s) | throughput (tok/s) | TPOT (s) | TTFT (s) "
              "| prefill (tok/s) | weights read (GB/s) |\n|---|---|---|---|---|---|---|---|---|")


def table_row(r: BenchRow) -> str:
    return (f"| {r.input_len} | {r.output_len} | {r.batch} | {r.latency_s:.3f} | {r.throughput_tps:.2f} "
            f"| {r.tpot_s:.4f} | {r.ttft_s:.3f} | {r.prefill_tps:.1f} | {r.bandwidth_gbps:.1f} |")


def _lengths(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ErnieError(f"{option} {text!r}: expected positive integers separated by commas, e.g. 7,11,33")
    return values


def run_bench(args) -> int:
    from .predictor import ErniePredictor

    input_lens = _lengths(args.input_lens, "--input-lens")
    output_lens = _lengths(args.output_lens, "--output-lens")
    for option, value in (("--batch", args.batch), ("--repeat", args.repeat)):
        if value < 1:
            raise ErnieError(f"{option} {value}: must be at least 1")
    if args.warmup < 0:
        raise ErnieError(f"--warmup {args.warmup}: must be at least 0")
    start = time.perf_counter()
    pred = ErniePredictor.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                          weight_dtype=args.weight_dtype, quantization=args.quantization)
    load_s = time.perf_counter() - start
    limit = pred.config.max_position_embeddings
    if max(input_lens) + max(output_lens) > limit:
        raise ErnieError(f"--input-lens/--output-lens: {max(input_lens)} + {max(output_lens)} tokens exceed the "
                         f"model's {limit} positions")
    model = pred.model
    nbytes, read = weight_bytes(model), step_bytes(model)
    active = f", {read / 1e9:.2f} GB read per token (the routed experts only)" if read != nbytes else ""
    print(f"{args.model} on {pred.device}, {pred.dtype} (weights held in {model.weight_dtype}), "
          f"batch {args.batch}: weights {nbytes / 1e9:.2f} GB{active}, "
          f"loaded in {load_s:.1f} s")
    print(TABLE_HEAD, flush=True)  # then each row as it is measured
    rows = run(model, pred.device, input_lens, output_lens, args.batch, args.warmup, args.repeat,
               measured=lambda row: print(table_row(row), flush=True))
    peak = peak_memory(pred.device)  # before the ceilings, which copy the weights
    ceiling_s, kernel_s = matmul_ceiling(model, pred.device), kernel_ceiling(model, pred.device)
    if ceiling_s:
        print(f"Paddle's bare matmuls over these weights: {1 / ceiling_s:.1f} tok/s at batch 1 "
              f"({read / ceiling_s / 1e9:.1f} GB/s)")
    else:
        print(f"Paddle's bare matmuls: none over {model.weight_dtype} weights in {pred.dtype}"
              + ("" if model.weight_dtype in quant.FORMATS else " (--weight-dtype float32 measures them)"))
    if kernel_s:
        print(f"the CPU decoding kernel's bare matmuls: {1 / kernel_s:.1f} tok/s ({read / kernel_s / 1e9:.1f} GB/s)")
    print(f"peak memory: {peak / 2**30:.2f} GiB" if peak else "peak memory: not reported by this device")
    if args.json_out:
        report = dict(model=str(args.model), device=pred.device, dtype=pred.dtype,
                      weight_dtype=model.weight_dtype, batch=args.batch,
                      weight_bytes=nbytes, step_bytes=read, load_s=load_s, peak_memory_bytes=peak,
                      matmul_ceiling_tps=1 / ceiling_s if ceiling_s else None, kernel_ceiling_tps=1 / kernel_s if kernel_s else None,
                      rows=[asdict(r) for r in rows])
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0
