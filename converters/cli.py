"""The `convert` command (also `ernie-paddle convert` and `python -m converters`): argument parsing only."""

from __future__ import annotations

import argparse
import re
import signal
import sys

from ernie_paddle.errors import ErnieError

SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    match = SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    size = int(float(match[1]) * UNITS[(match[2] or "B").lower()])
    if size <= 0:  # 0 wrote one shard per tensor
        raise argparse.ArgumentTypeError(f"{text!r} is not a size a shard can have; write e.g. 5GB, 500MB or 2GiB")
    return size


EXAMPLES = {  # the example that ends each help text
    None: ["{prog} pt2paddle ./ERNIE-4.5-0.3B-PT ./ERNIE-4.5-0.3B-Paddle",
           "{prog} verify ./ERNIE-4.5-0.3B-PT ./ERNIE-4.5-0.3B-Paddle"],
    "pt2paddle": ["{prog} pt2paddle baidu/ERNIE-4.5-0.3B-PT ./ERNIE-4.5-0.3B-Paddle"],
    "paddle2pt": ["{prog} paddle2pt ./ERNIE-4.5-0.3B-Paddle ./ERNIE-4.5-0.3B-PT --max-shard-size 5GB"],
    "verify": ["{prog} verify ./ERNIE-4.5-0.3B-PT ./ERNIE-4.5-0.3B-Paddle"],
}


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Convert ERNIE 4.5 checkpoints between the -PT "
                                "(transformers) and -Paddle (ERNIEKit / FastDeploy) layouts, bit-exact.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (("pt2paddle", "-PT (transformers) to -Paddle (ERNIEKit / FastDeploy)"),
                            ("paddle2pt", "-Paddle to -PT")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("src", metavar="SRC", help="model directory or hub id")
        c.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
        c.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="auto keeps every tensor's dtype bit for bit (default)")
        c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        c.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                       help="e.g. 5GB; default: shard like the input")
        c.add_argument("--allow-pickle", action="store_true",
                       help="read *.pdparams weights (a pickle: only for files you trust)")
        c.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("verify", help="exit 0 if A and B hold the same tensors after mapping, else 1")
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.add_argument("--allow-pickle", action="store_true")
    c.add_argument("--quiet", action="store_true")
    for name, command in {None: p, **sub.choices}.items():
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        command.epilog = f"example{'s' if len(EXAMPLES[name]) > 1 else ''}:\n  " + "\n  ".join(
            EXAMPLES[name]).format(prog=prog)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a conversion cleans up the same way."""


def terminate(signum, frame):
    raise Terminated


def negative_sizes_joined(argv: list[str]) -> list[str]:
    """`--max-shard-size -5GB` as `--max-shard-size=-5GB`: argparse takes a value with a leading '-' for an
    option and says only 'expected one argument'; joined, parse_size names the bad size."""
    joined = []
    for arg in argv:
        if joined and joined[-1] == "--max-shard-size" and arg[:1] == "-" and arg[1:2].isdigit():
            joined[-1] = f"--max-shard-size={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv=None, prog: str = "convert") -> int:
    args = parser(prog).parse_args(negative_sizes_joined(sys.argv[1:] if argv is None else list(argv)))
    from .convert import paddle2pt, pt2paddle, verify  # after parsing: `--help` stays instant

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        if args.command == "verify":
            result = verify(args.a, args.b, allow_pickle=args.allow_pickle, progress=not args.quiet)
            if result.difference:
                print(f"{args.a} and {args.b} differ: {result.difference}", file=sys.stderr)
                return 1
            print(f"{args.a} and {args.b} hold the same {result.tensors} tensors")
            return 0
        command = pt2paddle if args.command == "pt2paddle" else paddle2pt
        result = command(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                         max_shard_size=args.max_shard_size, allow_pickle=args.allow_pickle,
                         progress=not args.quiet)
    except ErnieError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.skipped:
        print(f"skipped {len(result.skipped)} tensors the target layout does not hold "
              f"(tied lm_head copy, mtp_*): {', '.join(result.skipped[:3])}{' ...' if len(result.skipped) > 3 else ''}",
              file=sys.stderr)
    rate = result.nbytes / max(result.seconds, 1e-9) / 1e6
    print(f"wrote {result.dst}: {result.tensors} tensors, {result.nbytes / 1e6:.1f} MB in {result.seconds:.1f} s "
          f"({rate:.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
