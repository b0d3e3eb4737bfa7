"""The logit checker: ErniePredictor (the candidate) against a reference, prompt by prompt.

The reference is transformers' `Ernie4_5ForCausalLM` (`Ernie4_5_MoeForCausalLM` for MoE models) in
float32 on CPU, or ErniePredictor itself on CPU in float32 (to check a device or a dtype). Both sides
see the same token ids; the metrics compare their probability distributions at the next token after
each prompt and at every prompt position, and the tokens they generate greedily. `compare()` and the
metric functions are the library; `run_check()` is the CLI.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import Checkpoint, resolve_model_dir
from .config import PT_ARCHITECTURE, ErnieConfig
from .errors import ErnieError

# The eight prompts of the published Ascend accuracy table (the last one is cut short there).
DEFAULT_PROMPTS = [
    "The capital of China is",
    "Machine learning is a field of",
    "自然语言处理是人工智能中的重要方向,它主要研究",
    "Python is a programming language that",
    "The theory of relativity was developed by",
    "上海是中国最大的城市之一,它位于",
    "In mathematical optimization, gradient descent is",
    "The Jupyter Notebook is an open-source web application that",
]
GREEDY_TOKENS = 32
INSTALL_CHECK = "pip install 'ernie-paddle[check]'"


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float   # cosine similarity of the probability vectors, at every prompt position
    max_abs_dp: float   # largest |Δp| of any token at any prompt position
    max_kl: float       # KL(reference ‖ candidate) in nats, at every prompt position
    min_top1: float     # fraction of prompt positions whose top-1 token agrees; above 0 the next token must agree
    min_greedy: float   # fraction of the reference's greedy tokens the candidate reproduces before the first difference


# float32 against float32 differs only by summation order: about 1e-6 in probabilities.
STRICT = Thresholds(min_cosine=0.99999, max_abs_dp=1e-4, max_kl=1e-5, min_top1=1.0, min_greedy=1.0)
# A 16-bit candidate against a float32 reference: each weight and activation rounded to 8 bits of mantissa
# moves probabilities by about 1e-3; greedy decoding may leave the reference's path at any later near tie.
LOOSE = Thresholds(min_cosine=0.99, max_abs_dp=0.05, max_kl=0.02, min_top1=0.9, min_greedy=0.0)
# A wint8 / wint4 candidate (quantized at load) against the same weights in float32: each weight rounded to
# 8 or 4 bits (a scale per 32) and each activation to 8 bits, as llama.cpp's Q8_0 / Q4_0 do. The worst
# position of the demo model's 8 prompts reached cosine 0.990 / 0.786, max |dp| 0.098 / 0.35, KL 0.025 /
# 1.84 and top-1 100% / 94% (wint8 / wint4): these limits leave room above that, and a wrong layout or
# kernel (cosine near 0) still fails.
QUANTIZED = {"wint8": Thresholds(min_cosine=0.98, max_abs_dp=0.15, max_kl=0.05, min_top1=0.95, min_greedy=0.0),
             "wint4": Thresholds(min_cosine=0.7, max_abs_dp=0.5, max_kl=2.5, min_top1=0.85, min_greedy=0.0)}


@dataclass
class Side:
    """One side of the comparison: what it is, and two functions of a prompt's token ids."""
    label: str
    logits: Callable[[list[int]], np.ndarray]            # float32 [positions, vocab]
    generate: Callable[[list[int], int], list[int]]      # greedy continuation of at most n tokens


@dataclass
class Agreement:
    """How two sets of next-token distributions agree, over some prompt positions."""
    positions: int
    mean_abs_dp: float    # mean |Δp| over positions and vocabulary (the seed table's MAD)
    max_abs_dp: float
    cosine: float         # the lowest over the positions
    kl: float             # KL(reference ‖ candidate) in nats, the highest over the positions
    top1: int             # positions whose top-1 token agrees
    top5_overlap: float   # mean fraction of the reference's top 5 tokens also in the candidate's top 5


@dataclass
class PromptResult:
    prompt: str
    token_ids: list[int]
    reference_top1: int
    candidate_top1: int
    next_token: Agreement
    all_positions: Agreement
    reference_greedy: list[int]
    candidate_greedy: list[int]
    greedy_agreement: int  # tokens generated identically before the first difference
    failures: list[str] = field(default_factory=list)


@dataclass
class Report:
    thresholds: Thresholds
    greedy_tokens: int
    prompts: list[PromptResult]

    @property
    def passed(self) -> bool:
        return not any(p.failures for p in self.prompts)

    def failures(self) -> list[str]:
        """One line per failing prompt, naming the prompt and each metric that crossed its threshold."""
        return [f"prompt {i} ({short(p.prompt)}): {'; '.join(p.failures)}"
                for i, p in enumerate(self.prompts, 1) if p.failures]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float64, so that the metrics measure the models, not the rounding of the metrics."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_k(p: np.ndarray, k: int) -> np.ndarray:
    k = min(k, p.shape[-1])
    return np.argpartition(-p, k - 1, axis=-1)[..., :k]


def kl_divergence(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) in nats at each position, from log-probabilities [positions, vocab]."""
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)


def agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> Agreement:
    """Distribution metrics between two [positions, vocab] logit arrays."""
    log_p, log_q = log_softmax(reference_logits), log_softmax(candidate_logits)
    p, q = np.exp(log_p), np.exp(log_q)
    dp = np.abs(p - q)
    cosine = (p * q).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(q, axis=-1))
    kl = kl_divergence(log_p, log_q)
    top5_p, top5_q = top_k(p, 5), top_k(q, 5)
    overlap = [len(set(a) & set(b)) / len(a) for a, b in zip(top5_p, top5_q)]
    return Agreement(positions=len(p), mean_abs_dp=float(dp.mean()), max_abs_dp=float(dp.max()),
                     cosine=float(cosine.min()), kl=float(kl.max()),
                     top1=int((p.argmax(-1) == q.argmax(-1)).sum()), top5_overlap=float(np.mean(overlap)))


def until_eos(tokens: list[int], eos_ids) -> list[int]:
    """The tokens up to and including the first end-of-sequence token."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1]
    return tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def threshold_failures(result: PromptResult, t: Thresholds, decode: Callable[[int], str]) -> list[str]:
    """The thresholds a prompt crosses, each naming its metric. Cosine, |Δp| and KL are checked over all
    prompt positions, which include the next token."""
    a = result.all_positions
    found = []
    if a.cosine < t.min_cosine:
        found.append(f"cosine {a.cosine:.8f} < {t.min_cosine} (lowest over {a.positions} positions)")
    if a.max_abs_dp > t.max_abs_dp:
        found.append(f"max |Δp| {a.max_abs_dp:.3g} > {t.max_abs_dp:g}")
    if a.kl > t.max_kl:
        found.append(f"KL {a.kl:.3g} > {t.max_kl:g} (highest over {a.positions} positions)")
    if t.min_top1 > 0 and result.reference_top1 != result.candidate_top1:
        found.append(f"top-1 of the next token differs: reference {decode(result.reference_top1)}, "
                     f"candidate {decode(result.candidate_top1)}")
    if a.top1 < t.min_top1 * a.positions:
        found.append(f"top-1 agreement {a.top1}/{a.positions} positions < {t.min_top1:.0%}")
    expected = len(result.reference_greedy)
    if result.greedy_agreement < t.min_greedy * expected:
        found.append(f"greedy agreement {result.greedy_agreement}/{expected} tokens < {t.min_greedy:.0%}")
    return found


def compare(reference: Side, candidate: Side, prompts: list[list[int]], texts: list[str] | None = None,
            thresholds: Thresholds = STRICT, greedy_tokens: int = GREEDY_TOKENS, eos_ids=(2,),
            decode: Callable[[int], str] = repr) -> Report:
    """Compare the two sides on each prompt (token ids; `texts` are the prompts as shown) and check the
    thresholds. `decode` shows a token in failure messages."""
    from tqdm import tqdm

    results = []
    for ids, text in tqdm(list(zip(prompts, texts or [str(p) for p in prompts])), desc="comparing", unit="prompt",
                          file=sys.stderr, leave=False, disable=None):  # None: a bar only on a terminal
        ref_logits, cand_logits = reference.logits(ids), candidate.logits(ids)
        ref_greedy = until_eos(reference.generate(ids, greedy_tokens), eos_ids) if greedy_tokens else []
        cand_greedy = until_eos(candidate.generate(ids, greedy_tokens), eos_ids) if greedy_tokens else []
        result = PromptResult(
            prompt=text, token_ids=list(ids),
            reference_top1=int(ref_logits[-1].argmax()), candidate_top1=int(cand_logits[-1].argmax()),
            next_token=agreement(ref_logits[-1:], cand_logits[-1:]), all_positions=agreement(ref_logits, cand_logits),
            reference_greedy=ref_greedy, candidate_greedy=cand_greedy,
            greedy_agreement=common_prefix(ref_greedy, cand_greedy))
        result.failures = threshold_failures(result, thresholds, decode)
        results.append(result)
    return Report(thresholds, greedy_tokens, results)


def predictor_side(pred, label: str) -> Side:
    paddle = _paddle()

    # Loading another predictor switches Paddle's current device; each call switches back to its own.
    def logits(ids):
        paddle.set_device(pred.device)
        return pred.logits([ids])[0]

    def generate(ids, n):
        paddle.set_device(pred.device)
        return pred.generate([ids], max_new_tokens=n, temperature=0.0)[0].token_ids

    return Side(label, logits, generate)


def _paddle():
    from .device import import_paddle
    return import_paddle()


def import_torch_reference(kind: str = "dense"):
    """torch and transformers' model class for a dense or MoE ERNIE 4.5, or one line saying how to install them."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ErnieError(f"--reference transformers needs torch and transformers, which are not installed: "
                         f"{INSTALL_CHECK} (or use --reference cpu)") from None
    name = PT_ARCHITECTURE[kind]
    model_class = getattr(transformers, name, None)
    if model_class is None:
        raise ErnieError(f"transformers {transformers.__version__} has no {name} (needs 4.54 or newer): "
                         f"{INSTALL_CHECK}")
    return torch, model_class


def torch_available() -> bool:
    try:
        import_torch_reference()
    except ErnieError:
        return False
    return True


def transformers_side(directory: Path, eos_ids, pad_id: int, progress: bool = True) -> Side:
    """transformers' model in float32 on CPU; a -Paddle directory is converted to -PT in a temporary directory."""
    torch, model_class = import_torch_reference(ErnieConfig.from_dir(directory).kind)
    from transformers import GenerationConfig, __version__
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own output is the table

    with tempfile.TemporaryDirectory(prefix="ernie-check-") as tmp:
        pt_dir = directory
        if Checkpoint(directory).layout == "paddle":
            from converters.convert import paddle2pt
            pt_dir = Path(tmp) / "PT"
            paddle2pt(directory, pt_dir, progress=progress)
        model = model_class.from_pretrained(pt_dir, dtype=torch.float32).eval()
    # Our own settings, not the checkpoint's generation_config.json (which samples).
    settings = dict(do_sample=False, eos_token_id=list(eos_ids), pad_token_id=pad_id)

    def logits(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()

    def generate(ids, n):
        tokens = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                                 generation_config=GenerationConfig(max_new_tokens=n, **settings))
        return out[0, len(ids):].tolist()

    return Side(f"transformers {__version__} {model_class.__name__}, float32 on cpu", logits, generate)


def config_difference(model_dir: Path, reference_dir: Path) -> str | None:
    """A note when the two models are not the same architecture: then no threshold can hold."""
    model, reference = ErnieConfig.from_dir(model_dir), ErnieConfig.from_dir(reference_dir)
    differ = [f"{key} {getattr(model, key)!r} against {getattr(reference, key)!r}" for key in model.__dataclass_fields__
              if key not in ("dtype", "extra") and getattr(model, key) != getattr(reference, key)]
    return f"the two config.json differ ({'; '.join(differ)}): these are different models" if differ else None


# What two models must share for their next-token probabilities to be compared at all; other keys
# (dtype, rope_theta, eos ids, ...) may differ and are named in a note.
SHAPE_KEYS = ("kind", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "use_bias")


def check_same_shape(model_dir: Path, reference_dir: Path):
    """Refuse, before loading either model, a reference whose architecture or sizes are not those of --model:
    the first differing key is named (a different vocabulary ended in a broadcasting traceback)."""
    model, reference = ErnieConfig.from_dir(model_dir), ErnieConfig.from_dir(reference_dir)

    def shape(config):
        moe = config.moe.__dict__ if config.moe else {}
        return [(key, getattr(config, key)) for key in SHAPE_KEYS] + [(f"moe {key}", value) for key, value in moe.items()]

    for (key, ours), (_, theirs) in zip(shape(model), shape(reference)):
        if ours != theirs:
            raise ErnieError(f"--reference-model {reference_dir}: its {key} {theirs!r} is not that of --model "
                             f"{model_dir} ({ours!r}): the two cannot be compared; pass the model that --model "
                             "was converted from")


def check_room_for_conversion(reference_dir: Path):
    """transformers reads -PT weights only, so a -Paddle reference is converted into a temporary folder
    first: say before any loading when it would not fit there."""
    checkpoint = Checkpoint(reference_dir)
    if checkpoint.layout != "paddle":
        return
    folder = tempfile.gettempdir()
    needed, free = sum(t.nbytes for t in checkpoint.tensors.values()), shutil.disk_usage(folder).free
    if needed > free:
        raise ErnieError(f"{reference_dir}: transformers reads -PT weights, so check converts this -Paddle model "
                         f"into {folder} ({needed / 2**30:.2f} GiB), where {free / 2**30:.2f} GiB are free; set "
                         "TMPDIR to a roomier folder, or pass the -PT checkpoint as --reference-model")


def encode_prompts(model_dir: Path, prompts: list[str], path: str | None, greedy_tokens: int) -> list[list[int]]:
    """The prompts' token ids, checked before any model loads: each with its greedy tokens must fit the
    model's positions."""
    from .tokenizer import Tokenizer

    if not (model_dir / "tokenizer.model").is_file():
        raise ErnieError(f"{model_dir}: no tokenizer.model, which the checker needs to encode its prompts")
    tokenizer, positions = Tokenizer(model_dir), ErnieConfig.from_dir(model_dir).max_position_embeddings
    encoded = [tokenizer.encode(p) for p in prompts]
    for number, ids in enumerate(encoded, 1):
        if len(ids) + greedy_tokens > positions:
            raise ErnieError(f"--prompts {path or '(the default prompts)'}: prompt {number} has {len(ids)} tokens, "
                             f"which with --greedy-tokens {greedy_tokens} exceed the model's {positions} positions; "
                             "shorten it or lower --greedy-tokens")
    return encoded


def load_prompts(path: str | None) -> list[str]:
    """The default prompts, or a file's: one per line, or JSONL with a "prompt" field."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ErnieError(f"--prompts {path}: cannot read ({e})") from None
    if not lines:
        raise ErnieError(f"--prompts {path}: no prompts in the file")
    if not all(line.lstrip().startswith("{") for line in lines):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            prompt = None
        if not isinstance(prompt, str) or not prompt:
            raise ErnieError(f"--prompts {path}: line {number} is not a JSON object with a non-empty \"prompt\" string")
        prompts.append(prompt)
    return prompts


def stored_dtype(directory: Path) -> str:
    """The dtype holding most of a checkpoint's bytes."""
    ckpt = Checkpoint(directory)
    sizes = Counter()
    for name, info in ckpt.tensors.items():
        sizes[ckpt.dtype(name)] += info.nbytes
    return sizes.most_common(1)[0][0]


def candidate_precision(dtype: str, weights: str, reference_weights: str) -> str:
    """What the candidate is against a float32 reference: its compute dtype, or its stored weights' dtype
    when those are 16-bit and the reference's are not (a bf16 conversion checked against its fp32 source)."""
    if dtype != "float32":
        return dtype
    if weights in QUANTIZED:
        return weights
    return weights if weights in ("bfloat16", "float16") and reference_weights == "float32" else "float32"


def thresholds_from_args(args, precision: str) -> Thresholds:
    base = STRICT if precision == "float32" else QUANTIZED.get(precision, LOOSE)
    overrides = {f.name: getattr(args, f.name) for f in fields(Thresholds) if getattr(args, f.name) is not None}
    return replace(base, **overrides)


def versions() -> dict:
    found = {"paddle": _paddle().__version__}
    for name in ("torch", "transformers", "ernie-paddle", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def show(tokenizer, token: int) -> str:
    return json.dumps(tokenizer.decode([token]), ensure_ascii=False)


def short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width] + "..."


def summary(report: Report) -> dict:
    """The figures over all prompts: means of means, extremes of extremes, counts of agreements."""
    nexts = [p.next_token for p in report.prompts]
    alls = [p.all_positions for p in report.prompts]
    positions = sum(a.positions for a in alls)
    return {
        "next_token": {"prompts": len(nexts), "mean_abs_dp": float(np.mean([a.mean_abs_dp for a in nexts])),
                       "max_abs_dp": max(a.max_abs_dp for a in nexts),
                       "cosine_mean": float(np.mean([a.cosine for a in nexts])),
                       "cosine_min": min(a.cosine for a in nexts),
                       "kl_max": max(a.kl for a in nexts), "top1": sum(a.top1 for a in nexts),
                       "top5_overlap": float(np.mean([a.top5_overlap for a in nexts]))},
        "all_positions": {"positions": positions,
                          "mean_abs_dp": sum(a.mean_abs_dp * a.positions for a in alls) / positions,
                          "max_abs_dp": max(a.max_abs_dp for a in alls), "cosine_min": min(a.cosine for a in alls),
                          "kl_max": max(a.kl for a in alls), "top1": sum(a.top1 for a in alls),
                          "top5_overlap": sum(a.top5_overlap * a.positions for a in alls) / positions},
        "greedy": {"tokens": report.greedy_tokens,
                   "prompts_identical": sum(p.greedy_agreement == len(p.reference_greedy) for p in report.prompts),
                   "agreeing": sum(p.greedy_agreement for p in report.prompts),
                   "compared": sum(len(p.reference_greedy) for p in report.prompts)},
    }


def fraction(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.0%})" if whole else "0/0"


def render(report: Report, tokenizer) -> str:
    """The seed's accuracy table, one row per prompt (next-token figures, then agreeing tokens over all
    prompt positions and in greedy generation), then the summary over all prompts."""
    rows = ["| # | Prompt | Ref top-1 | Cand top-1 | MAD | max abs Δp | cosine | KL | top-5 | top-1 "
            "| top-1 all positions | greedy | result |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(report.prompts, 1):
        n = p.next_token
        rows.append(f"| {i} | {short(p.prompt)} | {show(tokenizer, p.reference_top1)} | "
                    f"{show(tokenizer, p.candidate_top1)} | {n.mean_abs_dp:.2e} | {n.max_abs_dp:.2e} | "
                    f"{n.cosine:.8f} | {n.kl:.2e} | {n.top5_overlap:.0%} | {'yes' if n.top1 else 'NO'} | "
                    f"{p.all_positions.top1}/{p.all_positions.positions} | "
                    f"{p.greedy_agreement}/{len(p.reference_greedy)} | {'FAIL' if p.failures else 'ok'} |")
    s = summary(report)
    n, a, g, t = s["next_token"], s["all_positions"], s["greedy"], report.thresholds
    return "\n".join(rows + [
        "",
        f"next token:    mean |Δp| {n['mean_abs_dp']:.2e}, max |Δp| {n['max_abs_dp']:.2e}, "
        f"cosine mean {n['cosine_mean']:.8f} min {n['cosine_min']:.8f}, KL max {n['kl_max']:.2e} nats, "
        f"top-1 {fraction(n['top1'], n['prompts'])}, top-5 overlap {n['top5_overlap']:.0%}",
        f"all positions: mean |Δp| {a['mean_abs_dp']:.2e}, max |Δp| {a['max_abs_dp']:.2e}, "
        f"cosine min {a['cosine_min']:.8f}, KL max {a['kl_max']:.2e} nats, "
        f"top-1 {fraction(a['top1'], a['positions'])}, top-5 overlap {a['top5_overlap']:.0%}",
        f"greedy ({g['tokens']} tokens): {g['prompts_identical']}/{len(report.prompts)} prompts identical, "
        f"{fraction(g['agreeing'], g['compared'])} tokens before the first difference",
        f"thresholds: cosine >= {t.min_cosine}, max |Δp| <= {t.max_abs_dp:g}, KL <= {t.max_kl:g}, "
        f"top-1 >= {t.min_top1:.0%}, greedy >= {t.min_greedy:.0%}",
    ])


def run_check(args) -> int:
    from .predictor import ErniePredictor

    model_dir = resolve_model_dir(args.model)
    reference_dir = resolve_model_dir(args.reference_model) if args.reference_model else model_dir
    reference_kind = args.reference or ("transformers" if torch_available() else "cpu")
    if reference_kind == "transformers":
        import_torch_reference()  # before any loading: a missing install is the first thing to hear about
    if args.greedy_tokens < 0:
        raise ErnieError(f"--greedy-tokens {args.greedy_tokens}: must be 0 (no generation) or more")
    prompts = load_prompts(args.prompts)
    prompt_ids = encode_prompts(model_dir, prompts, args.prompts, args.greedy_tokens)
    if args.reference_model:
        check_same_shape(model_dir, reference_dir)
    if reference_kind == "transformers":
        check_room_for_conversion(reference_dir)

    candidate = ErniePredictor.from_pretrained(model_dir, device=args.device, dtype=args.dtype,
                                               weight_dtype=args.weight_dtype, quantization=args.quantization)
    tokenizer = candidate.tokenizer
    weights, reference_weights = stored_dtype(model_dir), stored_dtype(reference_dir)
    if candidate.model.weight_dtype not in (candidate.dtype, weights):  # rounded at load: --weight-dtype bfloat16
        weights = candidate.model.weight_dtype
    precision = candidate_precision(candidate.dtype, weights, reference_weights)
    thresholds = thresholds_from_args(args, precision)
    eos_ids = candidate.config.eos_token_ids
    if reference_kind == "transformers":
        print(f"loading the reference: transformers on {reference_dir} ...", file=sys.stderr, flush=True)
        reference = transformers_side(reference_dir, eos_ids, candidate.config.pad_token_id)
    else:
        reference = predictor_side(ErniePredictor.from_pretrained(reference_dir, device="cpu", dtype="float32"),
                                   "ernie-paddle ErniePredictor, float32 on cpu")
    reference.label += f", weights {reference_dir} ({reference_weights})"
    cand_side = predictor_side(candidate, f"ernie-paddle ErniePredictor, {candidate.dtype} on {candidate.device}, "
                                          f"weights {model_dir} ({weights})")

    report = compare(reference, cand_side, prompt_ids, prompts, thresholds,
                     args.greedy_tokens, eos_ids, lambda token: show(tokenizer, token))
    note = config_difference(model_dir, reference_dir) if args.reference_model else (
        "both sides load the weights of --model: this shows that the implementations and devices agree, not that "
        "the weights are right; pass --reference-model DIR (e.g. the original of a conversion) to check those")
    kind = "strict" if precision == "float32" else "quantized" if precision in QUANTIZED else "loose"
    profile = f"{precision} candidate against a float32 reference: {kind}"

    print(f"reference: {reference.label}")
    print(f"candidate: {cand_side.label}")
    if note:
        print(f"note: {note}")
    print(f"thresholds: {profile}\n")
    print(render(report, tokenizer))
    for failure in report.failures():
        print(f"FAIL {failure}")
    failing = len(report.failures())
    print(f"FAIL: {failing} of {len(prompts)} prompts cross a threshold" if failing else
          f"PASS: all {len(prompts)} prompts within the thresholds")
    if args.json_out:
        data = {"passed": report.passed, "model": str(model_dir), "reference_model": str(reference_dir),
                "reference": reference.label, "candidate": cand_side.label, "device": candidate.device,
                "dtype": candidate.dtype, "precision": precision, "profile": profile, "note": note,
                "versions": versions(), "failures": report.failures(), "summary": summary(report), **asdict(report)}
        for entry, result in zip(data["prompts"], report.prompts):
            entry.update(reference_top1_text=tokenizer.decode([result.reference_top1]),
                         candidate_top1_text=tokenizer.decode([result.candidate_top1]),
                         reference_greedy_text=tokenizer.decode(result.reference_greedy),
                         candidate_greedy_text=tokenizer.decode(result.candidate_greedy))
        Path(args.json_out).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if failing:
        print(f"ernie-paddle check: FAIL {report.failures()[0]}", file=sys.stderr)
        return 1
    return 0
