"""The `ernie-paddle` command: argument parsing only; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ErnieError


def _device_args(p, default_dtype="auto"):
    p.add_argument("--device", default="auto", help="auto, cpu, gpu[:i], npu[:i] or another custom device")
    p.add_argument("--dtype", default=default_dtype, help="auto, float32, bfloat16, float16")
    p.add_argument("--weight-dtype", default="auto",
                   help="dtype the weight matrices are held in; auto keeps a bf16 checkpoint's in bf16 under "
                        "float32 on CPU (exact, half the memory); float32 widens them at load")


def _quantization_arg(p):
    p.add_argument("--quantization", default=None, choices=["wint8", "wint4"],
                   help="quantize the weight matrices as they load (CPU): 8 or 4 bits with a scale per 32 weights")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie-paddle", description="ERNIE 4.5 on PaddlePaddle")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("convert", help="convert between -PT and -Paddle layouts (same as `convert`)", add_help=False)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, help="model directory (either layout) or hub id")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set of ids holding this mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely ids (0: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL's penalty on seen ids (1: none)")
    p.add_argument("--seed", type=int, default=None, help="for reproducible sampling, 0..2**64-1")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _device_args(p)
    _quantization_arg(p)

    p = sub.add_parser("demo", help="the whole loop on the embedded tiny model")
    _device_args(p)

    p = sub.add_parser("check", help="compare logits against transformers or the CPU")
    p.add_argument("--model", required=True)
    p.add_argument("--reference", choices=["transformers", "cpu"], default=None,
                   help="default: transformers when torch is installed, else cpu")
    p.add_argument("--reference-model", default=None, help="take the reference weights from this directory")
    p.add_argument("--prompts", default=None, help="file with one prompt per line, or JSONL")
    p.add_argument("--json", dest="json_out", default=None, help="write every figure to this JSON file")
    p.add_argument("--greedy-tokens", type=int, default=32, help="tokens to generate greedily on both sides (0: none)")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="lowest cosine similarity of the probabilities at any position "
                        "(default 0.99999 fp32, 0.99 bf16/fp16)")
    p.add_argument("--max-abs-dp", type=float, default=None,
                   help="largest |probability difference| of any token (default 1e-4 fp32, 0.05 bf16/fp16)")
    p.add_argument("--max-kl", type=float, default=None,
                   help="largest KL(reference||candidate) in nats at any position (default 1e-5 fp32, 0.02 bf16/fp16)")
    p.add_argument("--min-top1", type=float, default=None,
                   help="fraction of positions with the same top-1 token (default 1.0 fp32, 0.9 bf16/fp16)")
    p.add_argument("--min-greedy", type=float, default=None,
                   help="fraction of greedy tokens generated identically (default 1.0 fp32, 0 bf16/fp16)")
    _device_args(p)
    _quantization_arg(p)

    p = sub.add_parser("bench", help="latency / throughput / TPOT table")
    p.add_argument("--model", required=True)
    p.add_argument("--input-lens", default="7,11,33", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--output-lens", default="32,64,128", help="generated tokens, comma-separated")
    p.add_argument("--batch", type=int, default=1, help="prompts per run; throughput counts all of them")
    p.add_argument("--warmup", type=int, default=1, help="short untimed runs first")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; the fastest is reported")
    p.add_argument("--json", dest="json_out", default=None, help="write every figure to this JSON file")
    _device_args(p)
    _quantization_arg(p)

    p = sub.add_parser("deploy", help="write a FastDeploy / vLLM / vLLM-Ascend serving config")
    p.add_argument("engine", choices=["fastdeploy", "vllm", "vllm-ascend"])
    p.add_argument("--model", required=True, help="local model directory (either layout)")
    p.add_argument("--out", required=True, help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--device", default=None, choices=["gpu", "xpu", "dcu", "iluvatar", "npu", "cpu"],
                   help="default: gpu (fastdeploy, vllm), npu (vllm-ascend); cpu: vllm's CPU build")
    p.add_argument("--quantization", default="none", choices=["none", "wint8", "wint4", "block_wise_fp8"])
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="default: the published recipe's, else the fewest devices that hold the weights")
    p.add_argument("--device-memory-gb", type=float, default=None,
                   help="memory of one device, to size tensor parallelism (default: 80 for gpu; see docs)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: 32768 FastDeploy, 4096 vLLM")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--kv-cache-ratio", type=float, default=None, help="FastDeploy only")
    p.add_argument("--port", type=int, default=None, help="API port (default: 8180 FastDeploy, 8000 vLLM)")
    p.add_argument("--metrics-port", type=int, default=None, help="FastDeploy only (default: port+1)")
    p.add_argument("--engine-worker-queue-port", type=int, default=None, help="FastDeploy only (default: port+2)")
    p.add_argument("--cache-queue-port", type=int, default=None, help="FastDeploy only (default: port+3)")
    p.add_argument("--no-port-check", action="store_true",
                   help="do not check that the ports are free here (the config is for another machine)")
    p.add_argument("--model-ref", default=None,
                   help="what the engine should load: a hub id or the path on the serving machine "
                        "(default: the absolute path of --model)")
    p.add_argument("--fastdeploy-version", default=None, help="FastDeploy release targeted (default: 2.3)")
    p.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                   help="vLLM only (default: auto on gpu, bfloat16 on npu, float32 on cpu)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("serve", help="serve the model over the OpenAI API, batching concurrent requests")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8180, help="0 picks a free port")
    p.add_argument("--served-model-name", default=None, help="default: the model directory's name")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together (KV-cache slots)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="tokens (prompt + output) a request may use; default: the model's, at most 2048")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more are answered 503 with Retry-After")
    p.add_argument("--max-tokens", type=int, default=None, help="the most tokens a request may ask for")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take in all, queueing included (default: no limit)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (not on /health)")
    _device_args(p)
    _quantization_arg(p)
    _add_help_texts(parser, sub)
    return parser


# The example that ends each help text (the options themselves are defined in _parser above).
EXAMPLES = {
    None: ["ernie-paddle demo",
           "ernie-paddle convert pt2paddle ./ERNIE-4.5-0.3B-PT ./ERNIE-4.5-0.3B-Paddle",
           'ernie-paddle generate --model ./ERNIE-4.5-0.3B-Paddle --prompt "The capital of France is" --stream'],
    "generate": ['ernie-paddle generate --model baidu/ERNIE-4.5-0.3B-PT --prompt "The capital of France is" '
                 "--max-new-tokens 32 --stream"],
    "demo": ["ernie-paddle demo --device cpu"],
    "check": ["ernie-paddle check --model ./ERNIE-4.5-0.3B-Paddle --reference-model ./ERNIE-4.5-0.3B-PT "
              "--json report.json"],
    "bench": ["ernie-paddle bench --model ./ERNIE-4.5-0.3B-Paddle --input-lens 7,128 --output-lens 128 "
              "--json bench.json"],
    "deploy": ["ernie-paddle deploy fastdeploy --model ./ERNIE-4.5-0.3B-PT --out fd --quantization wint8"],
    "serve": ["ernie-paddle serve --model ./ERNIE-4.5-0.3B-PT --port 8180"],
}


def version() -> str:
    from importlib import metadata  # here, not at the top: the entry point's imports are not Ctrl-C safe

    try:
        return metadata.version("ernie-paddle")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__
        return __version__


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples as written, and each option's default unless it has none or its help names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and not any(action.default is none for none in (None, False, argparse.SUPPRESS)) \
                and "default" not in text:
            text += f" (default: {action.default})" if text else f"default: {action.default}"
        return text


def _add_help_texts(parser, sub) -> None:
    """`--version`, each option's default, and an example at the end of every help text."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    for name, p in {None: parser, **sub.choices}.items():
        p.formatter_class = _HelpFormatter
        if name in EXAMPLES:
            p.epilog = f"example{'s' if len(EXAMPLES[name]) > 1 else ''}:\n  " + "\n  ".join(EXAMPLES[name])
    parser.epilog = "documentation: README.md and docs/ in the source tree\n\n" + parser.epilog


def _check_output_file(path):
    """Fail before minutes of work, not after, when a --json file cannot be written: open it for
    appending (which changes nothing in an existing file), and remove it again if it was not there."""
    if not path:
        return
    target = os.path.realpath(path)  # a link's target is what gets written
    existed = os.path.exists(target)
    try:
        with open(target, "a"):
            pass
    except OSError as e:
        raise ErnieError(f"--json {path}: cannot write this file ({e.strerror}); name a file in a folder "
                         "you can write to") from None
    if not existed:
        os.remove(target)


def _run(args) -> int:
    _check_output_file(getattr(args, "json_out", None))
    if args.command == "generate":
        if "" in (args.stop or []):
            raise ErnieError("--stop '': an empty stop string stops nothing; give the text to stop at")
        from .predictor import run_generate
        return run_generate(args)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(device=args.device, dtype=args.dtype, weight_dtype=args.weight_dtype)
    if args.command == "check":
        from .check import run_check
        return run_check(args)
    if args.command == "bench":
        from .bench import run_bench
        return run_bench(args)
    if args.command == "deploy":
        from .deploy import run_deploy
        return run_deploy(args)
    if args.command == "serve":
        from .serve import run_serve
        return run_serve(args)
    raise AssertionError(args.command)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else "(no command)"
    try:  # the imports too: numpy's alone take a tenth of a second, long enough for an early Ctrl-C
        if command == "convert":
            from converters.cli import main as convert_main
            return convert_main(argv[1:], prog="ernie-paddle convert")
        args = _parser().parse_args(argv)
        from .device import prepare_environment
        prepare_environment(getattr(args, "device", None) or "auto")
        return _run(args) or 0
    except ErnieError as e:
        print(f"ernie-paddle {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # nothing half-written: --json files and deploy's --out are written at the end
        print(f"ernie-paddle {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
