"""ErniePredictor: config + weights + tokenizer + generation, on cpu / gpu / npu."""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters import mapping

from . import cpu_ops, quant
from . import device as devices
from .checkpoint import CODES, DTYPES, ITEMSIZE, Checkpoint, cast, resolve_model_dir
from .config import ErnieConfig
from .errors import ErnieError
from .generate import Chunk, GenerationSettings, stream_batch
from .model import ErnieForCausalLM, Packed, causal_mask
from .sampling import check_sampling
from .tokenizer import Tokenizer

paddle = devices.import_paddle()

PROGRESS_BYTES = 256 << 20  # show a loading bar for checkpoints larger than this
READ_BLOCK_BYTES = 4 << 20  # checkpoint bytes read (and cast) at a time


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (eos or a stop string) or "length"
    prompt_tokens: int
    generated_tokens: int
    prompt_tps: float           # prefill tokens per second
    generation_tps: float       # decode tokens per second


def load_weights(model: ErnieForCausalLM, ckpt: Checkpoint, progress: bool = True):
    """Copy a checkpoint of either layout into the model, one tensor (or fused group) at a time, each
    cast to its parameter's dtype; -PT tensors are mapped on the fly with the converters' rules."""
    config = model.config
    layout = ckpt.layout
    groups, skipped = mapping.checked_plan(ckpt, config, layout, ckpt.directory)
    mtp = [name for name in skipped if mapping.SKIPPED.match(name)]
    if mtp and progress:
        print(f"ernie-paddle: skipping {len(mtp)} multi-token-prediction tensor{'s' * (len(mtp) > 1)} "
              f"({mtp[0]}, ...): they serve speculative decoding in serving engines, not generation here",
              file=sys.stderr)
    params = model.load_targets()
    total = sum(info.nbytes for info in ckpt.tensors.values())
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", file=sys.stderr,
               disable=True if not progress or total < PROGRESS_BYTES else None)  # None: only on a terminal
    for group in groups:
        sources = [group.paddle] if layout == "paddle" else list(group.pt)
        param, expert = params.pop(group.paddle)
        held = tuple(param.shape[1:] if expert is not None else param.shape)
        shape = held if group.how == mapping.COPY else held[::-1]  # the -Paddle tensor's
        expected = [shape] if layout == "paddle" else mapping.pt_shapes(group, shape, config)
        for name, want in zip(sources, expected):
            info = ckpt.tensors[name]
            if info.shape != tuple(want):
                raise ErnieError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but config.json "
                                 f"implies {list(want)}; the weights and config.json do not belong together")
        _fill(param, expert, ckpt, group, layout)
        bar.update(sum(ckpt.tensors[n].nbytes for n in sources))
    bar.close()
    if params:  # checked_plan lists what config.json needs; this holds it to what the model holds
        raise ErnieError(f"{ckpt.directory}: tensor {sorted(params)[0]!r} (or its -PT parts) is missing from the "
                         "checkpoint")


def _fill(param, expert: int | None, ckpt: Checkpoint, group: mapping.Group, layout: str):
    """Write one parameter (or one expert's matrix of a stacked one) from its checkpoint tensors. A CPU
    parameter is written in place through a numpy view of its memory, so loading never holds a second
    whole copy of a tensor: peak memory stays close to the weights themselves."""
    if isinstance(param, Packed):
        return _fill_packed(param, expert, ckpt, group, layout)
    on_cpu = param.place.is_cpu_place()
    dtype = str(param.dtype).removeprefix("paddle.")
    shape = param.shape[1:] if expert is not None else param.shape
    if on_cpu:
        held = _host_view(param)
        held = held[expert] if expert is not None else held
    else:
        held = np.empty(shape, DTYPES[CODES[dtype]][1])
    _read_group(ckpt, group, layout, held, dtype)
    if not on_cpu:  # Paddle takes uint16 numpy arrays as bf16 bits
        if expert is None:
            param.set_value(held)
        else:
            with paddle.no_grad():
                param[expert] = paddle.to_tensor(held, place=param.place)


def _fill_packed(packed: Packed, expert: int | None, ckpt: Checkpoint, group: mapping.Group, layout: str):
    """Quantize one matrix (or one expert's) as it loads, a block of rows at a time: each block read
    (bf16 as stored, other dtypes as float32) as the model holds the matrix ([out, in], a fused one's
    -PT parts stacked) and packed straight into the model's integers and scales. Blocks of a multiple
    of 8 rows pack as the whole matrix does (quant.py), so loading holds the quantized model and one
    block: the 0.3B model's embedding read whole was 212 MB of bf16 and 113 MB of packed copy on top.
    A -Paddle [in, out] matrix, whose rows are columns in the file, is read whole."""
    data, scales = _host_view(packed.data), _host_view(packed.scales)
    if expert is not None:
        data, scales = data[expert], scales[expert]
    names = [group.paddle] if layout == "paddle" else list(group.pt)
    dtype = "bfloat16" if all(ckpt.dtype(n) == "bfloat16" for n in names) else "float32"
    n, k = packed.shape[-2:]
    whole = layout == "paddle" and group.how != mapping.COPY
    per_block = n if whole else max(8, READ_BLOCK_BYTES // (k * ITEMSIZE[dtype]) // 8 * 8)
    block = np.empty((min(per_block, n), k), DTYPES[CODES[dtype]][1])
    for start in range(0, n, per_block):
        rows = block[:min(per_block, n - start)]
        _read_group(ckpt, group, layout, rows, dtype, first_row=start)
        quant.quantize(rows, packed.format, out=(data[start:start + len(rows)], scales[start:start + len(rows)]))


def _read_group(ckpt: Checkpoint, group: mapping.Group, layout: str, out: np.ndarray, dtype: str,
                first_row: int = 0):
    """A group's checkpoint tensors into `out` as the model holds the weight, or rows `first_row` on of it:
    a Linear weight [out, in], as the -PT tensors are (a fused one as its -PT parts stacked), where
    -Paddle ones are [in, out] and transposed block by block as they are read (whole only)."""
    if layout == "paddle":
        _read_blocks(ckpt, group.paddle, out, dtype, transpose=group.how != mapping.COPY, first_row=first_row)
        return
    part = 0  # the part's first row in the stacked matrix
    for name in group.pt:
        rows = ckpt.tensors[name].shape[0]
        lo, hi = max(part, first_row), min(part + rows, first_row + len(out))
        if lo < hi:
            _read_blocks(ckpt, name, out[lo - first_row:hi - first_row], dtype, first_row=lo - part)
        part += rows


def _host_view(param) -> np.ndarray:
    """A numpy array over a CPU parameter's memory. numpy has no bfloat16, so DLPack refuses one: its
    bits are viewed as uint16 (as checkpoint.py stores bf16) through the data pointer instead."""
    if param.dtype != paddle.bfloat16:
        return np.from_dlpack(param.detach())
    bits = (ctypes.c_uint16 * param.size).from_address(param.data_ptr())
    return np.ctypeslib.as_array(bits).reshape(param.shape)


def _read_blocks(ckpt: Checkpoint, name: str, out: np.ndarray, dtype: str, transpose: bool = False,
                 first_row: int = 0):
    """Read tensor `name` into `out` (same shape, or transposed when `transpose`; `dtype` storage), or
    its rows from `first_row` on into `out` (not transposed), a block of rows at a time."""
    info = ckpt.tensors[name]
    storage = DTYPES[CODES[info.dtype]][1]
    rows = out.T if transpose else out.reshape(out.shape[0], -1)  # the checkpoint's rows
    row_bytes = rows.shape[1] * ITEMSIZE[info.dtype]
    per_block = max(1, READ_BLOCK_BYTES // row_bytes)
    try:
        with open(info.file, "rb") as f:
            f.seek(info.start + first_row * row_bytes)
            for start in range(0, rows.shape[0], per_block):
                dst = rows[start:start + per_block]
                block = np.fromfile(f, dtype=storage, count=dst.size)
                if block.size != dst.size:
                    raise ErnieError(f"{info.file}: truncated while reading tensor {name!r}; "
                                     "re-download or re-convert it")
                block = cast(block, ckpt.dtype(name), dtype).reshape(dst.shape)
                if transpose:
                    cpu_ops.copy_transposed(block, out[:, start:start + per_block])
                else:
                    dst[...] = block
    except OSError as e:
        raise ErnieError(f"{info.file}: cannot read tensor {name!r} ({e.strerror})") from None


def resolve_weight_dtype(requested: str, place: str, dtype: str, ckpt: Checkpoint, quantization: str | None) -> str:
    """How the weight matrices are held for `from_pretrained(weight_dtype=requested, quantization=...)`:
    a dtype, or "wint8" / "wint4"."""
    if quantization is not None:
        if quantization not in quant.QUANTIZATIONS:
            raise ErnieError(f"--quantization {quantization}: choose wint8 or wint4 (or leave it out)")
        if requested not in (None, "auto"):
            raise ErnieError(f"--weight-dtype {requested} with --quantization {quantization}: give one of the two")
        if place != "cpu" or dtype != "float32":
            raise ErnieError(f"--quantization {quantization} runs on CPU in float32 here (--device cpu); on GPUs "
                             f"serve the model with FastDeploy: ernie-paddle deploy fastdeploy --quantization "
                             f"{quantization}")
        if not cpu_ops.available():
            raise ErnieError(f"--quantization {quantization} needs the CPU kernels, which are unavailable here "
                             "(see the line above); install a C++ compiler or leave --quantization out")
        return quantization
    stored = {ckpt.dtype(n) for n, info in ckpt.tensors.items()
              if len(info.shape) == 2 and not mapping.ROUTER.search(n)  # the MoE router stays float32
              and not mapping.SKIPPED.match(n)}  # nor are the skipped multi-token-prediction tensors loaded
    on_cpu = place == "cpu" and dtype == "float32"
    kernels = on_cpu and cpu_ops.available()  # built here the first time on this machine, not in a first request
    if requested in (None, "auto"):
        return "bfloat16" if kernels and stored == {"bfloat16"} else dtype
    if requested == dtype or (requested == "bfloat16" and kernels):
        return requested
    raise ErnieError(f"--weight-dtype {requested}: choose auto or {dtype} (the compute dtype)"
                     + ("" if not on_cpu else ", or bfloat16 with the CPU kernels"))


class ErniePredictor:
    def __init__(self, model: ErnieForCausalLM, tokenizer: Tokenizer | None, device: str, dtype: str,
                 directory: Path | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config: ErnieConfig = model.config
        self.device, self.dtype, self.directory = device, dtype, directory

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                        progress: bool = True, weight_dtype: str = "auto",
                        quantization: str | None = None) -> "ErniePredictor":
        """`dtype` is what the model computes in; `weight_dtype` what its weight matrices are held in:
        "auto" keeps a bfloat16 checkpoint's matrices in bfloat16 under float32 on CPU (exact: the
        kernels widen them as they read them, the same float32 results from half the memory and
        bandwidth), and is otherwise `dtype`. "float32" forces float32 copies. `quantization`
        "wint8" or "wint4" (CPU) quantizes the matrices as they load instead (quant.py)."""
        directory = resolve_model_dir(str(model))
        config = ErnieConfig.from_dir(directory)
        place = devices.resolve(device)
        dtype = devices.resolve_dtype(place, dtype)
        ckpt = Checkpoint(directory)
        try:
            tokenizer = Tokenizer(directory) if (directory / "tokenizer.model").is_file() else None
            net = ErnieForCausalLM(config, dtype, resolve_weight_dtype(weight_dtype, place, dtype, ckpt, quantization))
            load_weights(net, ckpt, progress)
        finally:
            ckpt.close()
        net.eval()
        return cls(net, tokenizer, place, dtype, directory)

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ErnieError(f"{self.directory}: no tokenizer.model, so prompts must be lists of token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ErnieError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ErnieError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def _settings(self, max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty,
                  prompt_lens) -> GenerationSettings:
        sampling = check_sampling(temperature, top_p, top_k, repetition_penalty, seed)
        if max_new_tokens < 1:
            raise ErnieError(f"max_new_tokens {max_new_tokens}: must be at least 1")
        if max(prompt_lens) + max_new_tokens > self.config.max_position_embeddings:
            raise ErnieError(f"prompt ({max(prompt_lens)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"the model's {self.config.max_position_embeddings} positions")
        if isinstance(stop, str):
            stop = [stop]
        return GenerationSettings(max_new_tokens, stop=[s for s in (stop or []) if s], **sampling)

    def _tokenizer_for_text(self) -> Tokenizer:
        return self.tokenizer or _NoTextTokenizer()

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop=None,
                 repetition_penalty: float = 1.0) -> list[GenerationResult]:
        """Generate for every prompt (a string or a list of token ids) as one batch."""
        paddle.set_device(self.device)  # another predictor may have made its own device current
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not len(prompts):
            raise ErnieError("no prompts: give at least one")
        ids = [self._ids(p) for p in prompts]
        settings = self._settings(max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty,
                                  [len(i) for i in ids])
        texts, tokens = [""] * len(ids), [[] for _ in ids]
        last: list[Chunk | None] = [None] * len(ids)
        for chunk in stream_batch(self.model, self._tokenizer_for_text(), ids, settings):
            texts[chunk.row] += chunk.text
            tokens[chunk.row].append(chunk.token)
            last[chunk.row] = chunk
        return [GenerationResult(texts[i], tokens[i], c.finish_reason, c.prompt_tokens, c.generated_tokens,
                                 c.prompt_tps, c.generation_tps) for i, c in enumerate(last)]

    def stream(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop=None, repetition_penalty: float = 1.0):
        """Yield Chunks (`.text`, `.token`, `.finish_reason` on the last one) for one prompt."""
        paddle.set_device(self.device)
        ids = [self._ids(prompt)]
        settings = self._settings(max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty,
                                  [len(ids[0])])
        yield from stream_batch(self.model, self._tokenizer_for_text(), ids, settings)

    def logits(self, batch) -> np.ndarray:
        """float32 logits [B, T, V] for every position, without a cache. Rows shorter than the
        longest are right-padded; their padded positions carry no meaning."""
        paddle.set_device(self.device)
        if len(batch) and isinstance(batch[0], (int, np.integer)):
            batch = [batch]
        ids = [self._ids(row) for row in batch]
        if not ids:
            raise ErnieError("no prompts: give at least one")
        length = max(len(r) for r in ids)
        padded = np.zeros([len(ids), length], dtype=np.int64)
        for i, row in enumerate(ids):
            padded[i, :len(row)] = row
        tokens = paddle.to_tensor(padded)
        positions = paddle.arange(length, dtype="int64").unsqueeze(0).expand([len(ids), length])
        valid = paddle.ones([len(ids), length], "int64")
        with paddle.no_grad():
            out = self.model(tokens, positions, causal_mask(valid, 0, length))
        return out.numpy()


class _NoTextTokenizer:
    """Stands in when a model directory has no tokenizer: ids only, no text."""
    pad_id = 0

    def detokenizer(self):
        return self

    def add(self, token):
        return ""

    def finish(self):
        return ""


def run_generate(args) -> int:
    check_sampling(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed)  # before loading
    pred = ErniePredictor.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                          weight_dtype=args.weight_dtype, quantization=args.quantization)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=args.stop, repetition_penalty=args.repetition_penalty)
    if args.stream:
        for prompt in args.prompt:
            print(prompt, end="", flush=True)
            for chunk in pred.stream(prompt, **kwargs):
                print(chunk.text, end="", flush=True)
            print()
            _summary(chunk)
        return 0
    for prompt, result in zip(args.prompt, pred.generate(args.prompt, **kwargs)):
        print(prompt + result.text)
        _summary(result)
    return 0


def _summary(result: GenerationResult | Chunk):
    """The command's line on stderr after each output, streamed (the last Chunk) or not."""
    print(f"[{result.finish_reason}; {result.prompt_tokens} prompt tokens at {result.prompt_tps:.1f} tok/s, "
          f"{result.generated_tokens} generated at {result.generation_tps:.1f} tok/s]", file=sys.stderr)
