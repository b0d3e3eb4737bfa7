"""Issue 19's serving targets side by side, in alternating rounds, each measurement started on an
idle CPU: `ernie-paddle serve` with 8 concurrent streaming clients against the same server with one
client and against ErniePredictor.generate of the same 8 prompts as one batch; the time to first
token of a request arriving while 7 others decode against one on the idle server; with
--vllm-python, vLLM's OpenAI server on the same -PT checkpoint loaded the same way; with
--quantization, ernie-paddle servers of the checkpoint quantized at load.

    python tools/bench_serve.py --model /work/bench/b03/pt --vllm-python /work/vllm-venv/bin/python \\
        --rounds 3 --json /tmp/serve.json

Every measurement also records the share of the machine's cores that other processes (not this one,
not the servers) used while it ran; one where they used more than a tenth is repeated, up to two
times (the repeated ones are kept in the JSON under "disturbed").

Clients are tools/load_test.py's (greedy, 128 new tokens, EOS suppressed with logit_bias so every
request generates them all). A checkpoint without tokenizer files (random weights) is served with
the demo model's, from a directory of links.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import load_test  # noqa: E402

DEMO = Path(__file__).parent.parent / "ernie_paddle" / "assets" / "ernie-4.5-tiny-demo-PT"
TOKENIZER_FILES = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
NAME = "bench"
PROMPT = "The capital of France is"
NO_EOS = {"2": -100}
PROBES = 10
DISTURBED = 0.1  # a measurement during which other processes used more of the cores is repeated
ATTEMPTS = 3
VLLM_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # vLLM keeps a core for its scheduler by default: both compute


def with_tokenizer(model: Path, work: Path) -> Path:
    """`model`, or a directory linking its files and the demo model's tokenizer when it has none."""
    if (model / "tokenizer.model").exists():
        return model
    linked = work / model.resolve().name
    linked.mkdir()
    for path in model.iterdir():
        (linked / path.name).symlink_to(path.resolve())
    for name in TOKENIZER_FILES:
        (linked / name).symlink_to(DEMO / name)
    return linked


class Server:
    """A server process in a session of its own (stopped with its children), its output in `log`;
    `url` once it answers (its port from `port`, or from the line ernie-paddle serve prints)."""

    def __init__(self, command: list[str], env: dict, log: Path, ready_s: float, port: int | None = None):
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + ready_s
        while port is None or not self._healthy(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{command[0]} did not start; see {log}:\n{log.read_text()[-2000:]}")
            time.sleep(1)
            if port is None and (match := re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())):
                port = int(match.group(1))
        self.url = f"http://127.0.0.1:{port}"

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: set[int]) -> float:
    """CPU seconds used so far by the processes `pids` and their descendants (every thread)."""
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = path.read_text().rsplit(")", 1)[1].split()  # after the name: state, ppid, ...
            stats[int(path.parent.name)] = int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime + stime
    tree, grew = set(pids), True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(stats[pid][1] for pid in tree if pid in stats) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def others_cpu(ours: set[int]):
    """A function giving the share of the machine's cores that processes other than `ours` (and their
    children) have used since this call."""
    machine, mine, start = machine_cpu_seconds(), cpu_seconds(ours), time.perf_counter()

    def share() -> float:
        used = machine_cpu_seconds() - machine - (cpu_seconds(ours) - mine)
        return max(0.0, used) / ((time.perf_counter() - start) * os.cpu_count())
    return share


def load(url: str, clients: int, max_tokens: int, probe: int = 0) -> dict:
    figures = load_test.run(Namespace(url=url, api_key=None, timeout=600, prompt=PROMPT, max_tokens=max_tokens,
                                      temperature=0.0, extra=json.dumps({"logit_bias": NO_EOS}), model=NAME,
                                      clients=clients, requests=clients, probe=probe))
    if figures["errors"]:
        raise SystemExit(f"{url}: {figures['errors'][:3]}")
    return figures


def undisturbed(run, ours: set[int]) -> dict:
    """run()'s figures, measured from an idle CPU; repeated (at most ATTEMPTS times in all) while other
    processes used more than DISTURBED of the machine's cores meanwhile, the repeated ones kept."""
    from ernie_paddle.bench import wait_for_idle_cpu

    disturbed = []
    while True:
        busy = wait_for_idle_cpu()
        others = others_cpu(ours)
        figures = {"cpu_busy_before": busy, **run()}
        figures["cpu_others_during"] = others()
        if figures["cpu_others_during"] <= DISTURBED or len(disturbed) + 1 == ATTEMPTS:
            return {**figures, "disturbed": disturbed}
        disturbed.append(figures)


def measure(url: str, max_tokens: int, ours: set[int]) -> dict:
    """One round against one server."""
    parts = {}
    for part, clients, probe in [("8 clients", 8, 0), ("1 client", 1, 0), ("busy probe", 7, PROBES),
                                 ("idle probe", 0, PROBES)]:
        def run(clients=clients, probe=probe):
            figures = load(url, clients, max_tokens, probe)
            return {k: figures[k] for k in ("tokens", "seconds", "tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50",
                                            "tpot_p99", "probe_ttft")}
        parts[part] = undisturbed(run, ours)
    return parts


def generate_batch(predictor, max_tokens: int, ours: set[int]) -> dict:
    def run():
        start = time.perf_counter()
        results = predictor.generate([PROMPT] * 8, max_new_tokens=max_tokens)
        seconds = time.perf_counter() - start
        tokens = sum(r.generated_tokens for r in results)
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    return undisturbed(run, ours)


def summary(parts: dict) -> dict:
    """The targets' figures of one round against one server, and the parts they come from."""
    p99 = lambda probe: load_test.percentile(probe, 99)  # noqa: E731
    return {"tokens_per_s_8": parts["8 clients"]["tokens_per_s"], "tokens_per_s_1": parts["1 client"]["tokens_per_s"],
            "ttft_p99_busy": p99(parts["busy probe"]["probe_ttft"]),
            "ttft_p99_idle": p99(parts["idle probe"]["probe_ttft"]),
            "cpu_others_during": max(part["cpu_others_during"] for part in parts.values()), "parts": parts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a -PT checkpoint (random weights will do)")
    parser.add_argument("--paddle-model", default=None, help="its -Paddle conversion, also served by ernie-paddle")
    parser.add_argument("--vllm-python", default=None, help="a Python where `import vllm` works (vllm-cpu)")
    parser.add_argument("--vllm-dtype", default="float32", help="float32 on CPUs without avx512_bf16 / AMX")
    parser.add_argument("--quantization", nargs="*", default=[], choices=["wint8", "wint4"],
                        help="also serve --model quantized at load this way (each its own server)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", default=None, help="write every round's figures here")
    args = parser.parse_args(argv)

    from ernie_paddle import ErniePredictor

    # Stopped with SIGTERM (a `timeout`), still stop the servers, which run in sessions of their own
    # (set after importing Paddle, which installs a handler of its own that aborts).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"{Path(__file__).name}: stopped by SIGTERM"))

    rounds, servers, vllm_error = [], {}, None
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        models = {"ernie-paddle": (with_tokenizer(Path(args.model), work), [])}
        if args.paddle_model:
            (work / "paddle").mkdir()
            models["ernie-paddle (-Paddle)"] = (with_tokenizer(Path(args.paddle_model), work / "paddle"), [])
        for quantization in args.quantization:
            models[f"ernie-paddle {quantization}"] = (models["ernie-paddle"][0], ["--quantization", quantization])
        try:
            for system, (model, options) in models.items():
                servers[system] = Server([sys.executable, "-m", "ernie_paddle", "serve", "--model", str(model),
                                          "--port", "0", "--served-model-name", NAME, "--max-num-seqs", "8", *options],
                                         os.environ, work / f"{len(servers)}.log", 300)
            if args.vllm_python:
                port = free_port()
                vllm = str(Path(args.vllm_python).parent / "vllm")
                try:
                    servers["vllm"] = Server([vllm, "serve", str(models["ernie-paddle"][0]), "--port", str(port),
                                              "--served-model-name", NAME, "--max-num-seqs", "8", "--max-model-len",
                                              "2048", "--kv-cache-memory-bytes", str(1 << 30), "--dtype",
                                              args.vllm_dtype], {**os.environ, **VLLM_ENV, "PATH": f"{Path(vllm).parent}:"
                                                                 f"{os.environ['PATH']}"}, work / "vllm.log", 900, port)
                except SystemExit as e:  # the rest is still worth measuring
                    vllm_error = str(e)
                    print(f"vLLM: {vllm_error}", file=sys.stderr)
            for server in servers.values():  # warm-up
                load(server.url, 8, 8)
            predictor = ErniePredictor.from_pretrained(str(models["ernie-paddle"][0]), device="cpu", progress=False)
            predictor.generate([PROMPT] * 8, max_new_tokens=8)
            ours = {os.getpid()} | {server.proc.pid for server in servers.values()}
            for r in range(args.rounds):
                figures = {system: summary(measure(server.url, args.max_tokens, ours))
                           for system, server in servers.items()}
                figures["generate"] = generate_batch(predictor, args.max_tokens, ours)
                rounds.append(figures)
                line = ", ".join(f"{system} " + "{tokens_per_s_8:.1f} tok/s with 8 clients, {tokens_per_s_1:.1f} "
                                 "with 1, TTFT p99 {ttft_p99_busy:.3f} s busy / {ttft_p99_idle:.3f} s idle, "
                                 "others' CPU up to {cpu_others_during:.0%}".format(
                                     **figures[system]) for system in servers)
                print(f"round {r + 1}: {line}; generate of 8 as one batch {figures['generate']['tokens_per_s']:.1f}"
                      " tok/s", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    report = {"tool": "bench_serve", "probes": PROBES, "model": args.model, "max_tokens": args.max_tokens, "clients": 8,
              "prompt": PROMPT,
              "vllm_dtype": args.vllm_dtype if args.vllm_python else None, "vllm_error": vllm_error, "rounds": rounds}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
