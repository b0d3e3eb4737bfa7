"""Load an OpenAI-compatible server (`ernie-paddle serve`, vLLM, FastDeploy) with concurrent
streaming clients; report aggregate tokens/s, time to first token and per-token latency.

    python tools/load_test.py --url http://127.0.0.1:8180 --clients 8 --requests 16 --max-tokens 128

Each of --clients threads streams completions (stream_options.include_usage, so tokens are counted
by the server) until --requests have been sent in all. With --probe K, K more requests of one token
are sent one after another once every client is decoding: their time to first token is that of a
request arriving at a busy server (with --clients 0, at an idle one). Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float):
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def stream(self, body: dict, on_first=None) -> dict:
        """One streamed completion: its first-token time, the gaps between chunks, tokens, error."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        start = time.perf_counter()
        result = {"ttft": None, "gaps": [], "tokens": 0, "error": None, "seconds": 0.0}
        try:
            conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True,
                                                                "stream_options": {"include_usage": True}}),
                         self.headers)
            response = conn.getresponse()
            if response.status != 200:
                result["error"] = f"HTTP {response.status}: {response.read()[:200]!r}"
                return result
            last = None
            for line in response:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result["error"] = event["error"]["message"]
                    break
                if event.get("usage"):
                    result["tokens"] = event["usage"]["completion_tokens"]
                if not event.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result["ttft"] = now - start
                    if on_first:
                        on_first()
                else:
                    result["gaps"].append(now - last)
                last = now
        except (OSError, http.client.HTTPException, ValueError) as e:
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            result["seconds"] = time.perf_counter() - start
            conn.close()
        return result


def run(args) -> dict:
    client = Client(args.url, args.api_key, args.timeout)
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
            **json.loads(args.extra)}
    if args.model:
        body["model"] = args.model
    results, lock = [], threading.Lock()
    sent = [0]
    decoding = threading.Semaphore(0)

    def worker():
        while True:
            with lock:
                if sent[0] >= args.requests:
                    return
                sent[0] += 1
            result = client.stream(body, on_first=decoding.release)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    probes = []
    if args.probe:
        for _ in range(args.clients):  # every client has its first token: all are decoding
            decoding.acquire()
        for _ in range(args.probe):
            probes.append(client.stream({**body, "max_tokens": 1}))
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if not r["error"]]
    tokens = sum(r["tokens"] for r in ok)
    per_token = [statistics.mean(r["gaps"]) for r in ok if r["gaps"]]
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "clients": args.clients, "requests": len(results), "errors": [r["error"] for r in results if r["error"]]
        + [p["error"] for p in probes if p["error"]],
        "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall if wall and results else 0.0,
        "ttft_p50": percentile([r["ttft"] for r in ok], 50), "ttft_p99": percentile([r["ttft"] for r in ok], 99),
        "tpot_p50": percentile(per_token, 50), "tpot_p99": percentile(per_token, 99),
        "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
        "probe_ttft": [p["ttft"] for p in probes if not p["error"]],
    }


def report(figures: dict) -> str:
    ms = 1000
    lines = [f"{figures['requests']} requests from {figures['clients']} clients in {figures['seconds']:.2f} s: "
             f"{figures['tokens']} tokens, {figures['tokens_per_s']:.1f} tok/s, {len(figures['errors'])} errors",
             f"TTFT p50 {figures['ttft_p50'] * ms:.1f} ms, p99 {figures['ttft_p99'] * ms:.1f} ms; "
             f"per-token latency (TPOT) p50 {figures['tpot_p50'] * ms:.1f} ms, p99 {figures['tpot_p99'] * ms:.1f} ms; "
             f"inter-token gaps p50 {figures['itl_p50'] * ms:.1f} ms, p99 {figures['itl_p99'] * ms:.1f} ms"]
    if figures["probe_ttft"]:
        probe = figures["probe_ttft"]
        lines.append(f"probe TTFT ({len(probe)} requests while the clients decode): p50 "
                     f"{percentile(probe, 50) * ms:.1f} ms, p99 {percentile(probe, 99) * ms:.1f} ms")
    lines += [f"error: {e}" for e in figures["errors"][:5]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8180", help="the server's base URL")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=None, help="requests in all (default: one per client)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--model", default=None, help="the `model` field (vLLM needs it)")
    parser.add_argument("--extra", default="{}", help='more request fields as JSON, e.g. \'{"ignore_eos": true}\'')
    parser.add_argument("--probe", type=int, default=0, help="one-token requests sent once all clients decode")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--json", dest="json_out", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.clients < 0 or (args.clients == 0 and not args.probe):
        parser.error("--clients must be at least 1 (or 0 with --probe)")
    args.requests = args.clients if args.requests is None else args.requests
    try:
        json.loads(args.extra)
    except ValueError as e:
        parser.error(f"--extra: not JSON ({e})")
    figures = run(args)
    print(report(figures))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(figures, f, indent=1)
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
