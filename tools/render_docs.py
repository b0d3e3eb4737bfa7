"""Render the measured tables of README.md and docs/*.md from the results files in docs/results/.

A table lives between `<!-- results:NAME -->` (or `<!-- results:NAME:VIEW -->`) and `<!-- /results -->`;
NAME is docs/results/NAME.json. A results file holds what one of the project's tools wrote with
--json (`ernie-paddle check`, `ernie-paddle bench`, tools/bench_vs_transformers.py, tools/bench_moe.py,
tools/bench_vs_llamacpp.py, also with --kl)
under "data", with the machine, versions, date and command that `record` adds, on the machine that
ran it, right after the run:

    ernie-paddle check --model M --json /tmp/check.json
    python tools/render_docs.py record check-demo /tmp/check.json --command "ernie-paddle check --model M"
    python tools/render_docs.py             # rewrite every marked region
    python tools/render_docs.py --check     # exit 1 if a region differs from its results file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
REGION = re.compile(r"(<!-- results:(?P<name>[\w.-]+)(?::(?P<view>\w+))? -->\n)(?P<body>.*?)(<!-- /results -->)",
                    re.DOTALL)
PACKAGES = ("paddlepaddle", "paddlepaddle-gpu", "paddle-custom-npu", "torch", "transformers", "ernie-paddle")


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# --- recording: a tool's JSON plus where and when it was measured ---------------------------------

def machine() -> dict:
    """The CPU, its vector width, usable cores and memory, as the figures depend on them."""
    info = {"system": platform.system(), "arch": platform.machine(), "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    cpuinfo, meminfo = Path("/proc/cpuinfo"), Path("/proc/meminfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        name = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
        info["cpu"] = name[1].strip() if name else info["cpu"]
        flags = set(flags[1].split()) if flags else set()
        info["simd"] = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    if meminfo.exists():
        total = re.search(r"^MemTotal:\s*(\d+) kB", meminfo.read_text(), re.MULTILINE)
        info["memory_gib"] = round(int(total[1]) / 2**20, 1) if total else None
    return info


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        found["commit"] = git.stdout.strip()
    return found


def record(name: str, tool_json: Path, command: str) -> Path:
    data = json.loads(tool_json.read_text(encoding="utf-8"))
    kind(data)  # refuse a file no renderer knows before writing anything
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "date": datetime.date.today().isoformat(), "machine": machine(),
                               "versions": versions(), "data": data}, ensure_ascii=False, indent=1) + "\n",
                   encoding="utf-8")
    return out


# --- rendering ------------------------------------------------------------------------------------

def kind(data: dict) -> str:
    """Which tool wrote `data`, from the keys each one writes."""
    if "summary" in data and "thresholds" in data:
        return "check"
    if data.get("tool") == "bench_vs_transformers":
        return "bench_vs_transformers"
    if "step_bytes_28_layers" in data:
        return "bench_moe"
    if "full_wint4" in data:
        return "bench_moe_full"
    if data.get("tool") == "kl_vs_llamacpp":
        return "kl_vs_llamacpp"
    if "llama_cpp_python" in data:
        return "bench_vs_llamacpp"
    if "rows" in data and "weight_bytes" in data:
        return "bench"
    if data.get("tool") == "bench_serve":
        return "bench_serve"
    raise ValueError(f"unknown results JSON (keys {sorted(data)[:8]}); expected what ernie-paddle check/bench, "
                     "bench_vs_transformers.py, bench_moe.py, bench_vs_llamacpp.py or bench_serve.py write")


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def check_table(data: dict, view: str) -> list[str]:
    s = data["summary"]
    n, a, g = s["next_token"], s["all_positions"], s["greedy"]
    if view == "summary":
        return table(["reference", "candidate", "prompts", "max \\|Δp\\|", "min cosine", "max KL", "top-1",
                      "greedy identical", "result"],
                     [[data["reference"], data["candidate"], n["prompts"], f"{a['max_abs_dp']:.2e}",
                       f"{a['cosine_min']:.8f}", f"{a['kl_max']:.2e}", f"{a['top1']}/{a['positions']}",
                       f"{g['prompts_identical']}/{n['prompts']}", "PASS" if data["passed"] else "FAIL"]])
    rows = [[i, p["prompt"].replace("|", "\\|"), json.dumps(p["reference_top1_text"], ensure_ascii=False),
             json.dumps(p["candidate_top1_text"], ensure_ascii=False), f"{p['next_token']['max_abs_dp']:.2e}",
             f"{p['next_token']['cosine']:.8f}", f"{p['next_token']['kl']:.2e}",
             f"{p['all_positions']['top1']}/{p['all_positions']['positions']}",
             f"{p['greedy_agreement']}/{len(p['reference_greedy'])}", "fail" if p["failures"] else "ok"]
            for i, p in enumerate(data["prompts"], 1)]
    return [f"Reference: {data['reference']}.  ", f"Candidate: {data['candidate']}.", ""] + table(
        ["#", "prompt", "reference top-1", "candidate top-1", "max \\|Δp\\|", "cosine", "KL", "top-1 all positions",
         "greedy", "result"], rows) + ["", f"All positions: max |Δp| {a['max_abs_dp']:.2e}, min cosine "
                                       f"{a['cosine_min']:.8f}, max KL {a['kl_max']:.2e} nats, top-1 {a['top1']}/"
                                       f"{a['positions']}; greedy tokens identical {g['agreeing']}/{g['compared']} "
                                       f"({g['prompts_identical']}/{n['prompts']} prompts). "
                                       f"{'PASS' if data['passed'] else 'FAIL'} ({data['profile']})."]


def bench_table(data: dict, view: str) -> list[str]:
    rows = [[r["input_len"], r["output_len"], r["batch"], f"{r['latency_s']:.3f}", f"{r['throughput_tps']:.2f}",
             f"{r['tpot_s'] * 1e3:.1f}", f"{r['ttft_s'] * 1e3:.1f}", f"{r['prefill_tps']:.1f}",
             f"{r['bandwidth_gbps']:.1f}"] for r in data["rows"]]
    ceilings = [f"{label} {data[key]:.1f} tok/s" for key, label in
                (("kernel_ceiling_tps", "the CPU decoding kernel's"), ("matmul_ceiling_tps", "Paddle's"))
                if data.get(key)]
    peak = f", peak memory {data['peak_memory_bytes'] / 2**30:.2f} GiB" if data.get("peak_memory_bytes") else ""
    return [f"{Path(data['model']).name} on {data['device']}, {data['dtype']} (weights held in "
            f"{data['weight_dtype']}): {data['weight_bytes'] / 1e9:.2f} GB of weights, {data['step_bytes'] / 1e9:.2f} "
            f"GB read per token, loaded in {data['load_s']:.1f} s{peak}.", ""] + table(
        ["input", "output", "batch", "latency (s)", "throughput (tok/s)", "TPOT (ms)", "TTFT (ms)",
         "prefill (tok/s)", "weights read (GB/s)"], rows) + (
        ["", "Bare matmuls over the same weights allow " + " and ".join(ceilings) + " at batch 1."]
        if ceilings else [])


def bench_vs_transformers_table(data: dict, view: str) -> list[str]:
    systems, batch = data["systems"], data["batch"]
    theirs = systems["transformers"]
    if view == "short":
        ours = systems["auto"]
        return table(["measure (ERNIE-4.5-0.3B shape, CPU, float32 compute)", "ernie-paddle (bf16 weights)",
                      "transformers", "ratio"],
                     [[f"decode, batch 1 (tok/s)", f"{ours['decode_tps']:.1f}", f"{theirs['decode_tps']:.1f}",
                       f"{ours['decode_tps'] / theirs['decode_tps']:.2f}x"],
                      [f"prefill, {data['prefill_len']}-token prompt (tok/s)", f"{ours['prefill_tps']:.0f}",
                       f"{theirs['prefill_tps']:.0f}", f"{ours['prefill_tps'] / theirs['prefill_tps']:.2f}x"],
                      [f"decode, batch {batch}, aggregate (tok/s)", f"{ours['batch_tps']:.1f}", "", ""]])
    rows = [[s["label"], f"{s['decode_tps']:.2f}", f"{s['decode_tps'] / theirs['decode_tps']:.2f}x",
             f"{s['ttft_s']:.3f}", f"{s['prefill_tps']:.1f}", f"{s['prefill_tps'] / theirs['prefill_tps']:.2f}x",
             f"{s['batch_tps']:.2f}" if s.get("batch_tps") else "-",
             f"{s['batch_tps'] / s['decode_tps']:.2f}x" if s.get("batch_tps") else "-"] for s in systems.values()]
    lines = table(["system", f"decode b1, {data['new_tokens']} new (tok/s)", "vs transformers", "TTFT (s)",
                   f"prefill {data['prefill_len']} (tok/s)", "vs transformers", f"batch {batch} (tok/s)",
                   "vs batch 1"], rows)
    notes = [f"Paddle's bare matmuls over the float32 weights allow {data['paddle_ceiling_tps']:.1f} tok/s"]
    held = {"auto": "bf16 weights", "float32": "float32 copies"}
    notes += [f"the CPU decoding kernel's over the {held[name]} {tps:.1f} tok/s"
              for name, tps in data["kernel_ceiling_tps"].items() if tps]
    loads = [f"{systems[name]['label']}: load to first token {load['load_to_first_token_s']:.2f} s, peak RSS of a "
             f"{data['new_tokens']}-token run {load['peak_rss_bytes'] / 1e9:.2f} GB"
             for name, load in data["loads"].items()]
    return lines + ["", "; ".join(notes) + ".", ""] + [f"- {line}" for line in loads] + (
        [f"- llama.cpp: {data['llama_cpp']}"] if data.get("llama_cpp") else [])


def bench_moe_table(data: dict, view: str) -> list[str]:
    best = {}
    for r in data["rounds"]:
        key = (r["system"], r["batch"])
        if key not in best or r["decode_tps"] > best[key]["decode_tps"]:
            best[key] = r
    labels = {"moe": f"ernie-paddle, 21B-A3B shape ({data['layers']} layers)", "dense": "ernie-paddle, dense 0.3B",
              "transformers": f"transformers, 21B-A3B shape ({data['layers']} layers)"}
    rows = [[labels[system], batch, f"{r['decode_tps']:.2f}", f"{r['read_gbps']:.1f}" if r.get("read_gbps") else "-",
             f"{r['cpu_busy_before']:.0%}"] for (system, batch), r in best.items()]
    moe1, dense1 = best["moe", 1], best["dense", 1]
    full = moe1["read_gbps"] * 1e9 / data["step_bytes_28_layers"]
    rounds = 1 + max(r["round"] for r in data["rounds"])
    return table(["system", "batch", f"decode, best of {rounds} round{'s' if rounds > 1 else ''} (tok/s)",
                  "weights read (GB/s)", "CPU busy before"], rows) + [
        "", f"The MoE model reads its routed weights at {moe1['read_gbps'] / dense1['read_gbps']:.0%} of the dense "
            f"model's GB/s; at that rate the full 28 layers ({data['step_bytes_28_layers'] / 1e9:.2f} GB per token) "
            f"would decode at {full:.2f} tok/s. Distinct experts per MoE layer and step: "
            f"{data['distinct_experts_b1']:.2f} at batch 1, {data['distinct_experts_batch']:.2f} at batch "
            f"{data['batch']}." + (f" In a fresh process: loaded in {data['load']['load_s']:.1f} s, peak RSS "
                                   f"{data['load']['peak_rss_bytes'] / 1e9:.2f} GB for {data['load']['weight_bytes'] / 1e9:.2f} "
                                   "GB of weights." if data.get("load") else "")]


def bench_vs_llamacpp_table(data: dict, view: str) -> list[str]:
    rows = [[f"{kind} / {r['quantization']}", f"{r['llama_cpp_tps']:.1f}", f"{r['ernie_paddle_tps']:.1f}",
             f"{r['ratio']:.2f}x"] for kind, r in data["results"].items()]
    rounds = max(len(r["rounds"]["llama.cpp"]) for r in data["results"].values())
    return table(["weights (llama.cpp / ernie-paddle)", "llama.cpp (tok/s)", "ernie-paddle (tok/s)", "ratio"], rows) + [
        "", f"Decode at batch 1, {data['new_tokens']} new tokens (llama-bench tg{data['new_tokens']}, "
            f"{data['threads']} threads; llama-cpp-python {data['llama_cpp_python']}'s llama.cpp), best of {rounds} "
            "alternating rounds."]


def kl_vs_llamacpp_table(data: dict, view: str) -> list[str]:
    rows = []
    for name, model in data["models"].items():
        for kind, r in model["results"].items():
            theirs, ours = r["llama_cpp"], r["ernie_paddle"]
            rows.append([name, f"{kind} / {r['quantization']}", model["positions"], f"{theirs['mean_kl']:.6f}",
                         f"{ours['mean_kl']:.6f}", f"{ours['mean_kl'] / theirs['mean_kl']:.2f}x",
                         f"{theirs['top1']:.1%}", f"{ours['top1']:.1%}"])
    aligned = "; ".join(f"{name} {m['float32_vs_llama_cpp_f32']['mean_kl']:.1e} nats, top-1 "
                        f"{m['float32_vs_llama_cpp_f32']['top1']:.0%}" for name, m in data["models"].items())
    context = next(iter(data["models"].values()))["context"]
    return table(["model", "weights (llama.cpp / ernie-paddle)", "positions", "llama.cpp KL", "ernie-paddle KL",
                  "ratio", "llama.cpp top-1", "ernie-paddle top-1"], rows) + [
        "", f"Mean KL(float32 ‖ quantized) in nats and top-1 agreement with float32, each system against its own "
            f"float32 run, over the positions llama-perplexity scores in the text of {data['text']} "
            f"(-c {context}: each chunk's second half), on the tokens it evaluated (llama-cpp-python "
            f"{data['llama_cpp_python']}'s llama.cpp, KV cache in float32). Both float32 runs on those positions, "
            f"against each other: {aligned}."]


def bench_moe_full_table(data: dict, view: str) -> list[str]:
    run = data["full_wint4"]
    return table(["model", "load (s)", "held weights (GB)", "peak RSS (GB)", "decode (tok/s)"],
                 [["21B-A3B shape, 28 layers, bf16 checkpoint loaded as wint4", f"{run['load_s']:.0f}",
                   f"{run['weight_bytes'] / 1e9:.2f}", f"{run['peak_rss_bytes'] / 1e9:.2f}", f"{run['decode_tps']:.2f}"]])


def bench_serve_table(data: dict, view: str) -> list[str]:
    systems = [system for system in data["rounds"][0] if system != "generate"]
    def others(figures: dict) -> str:
        return f"{figures['cpu_others_during']:.0%}" if "cpu_others_during" in figures else ""

    rows = []
    for i, figures in enumerate(data["rounds"], 1):
        generate = figures["generate"]["tokens_per_s"]
        for system in systems:
            s = figures[system]
            eight, one = s["tokens_per_s_8"], s["tokens_per_s_1"]
            unquantized = system.startswith("ernie-paddle") and not system.endswith(("wint8", "wint4"))
            rows.append([i, system, f"{eight:.1f}", f"{one:.1f}", f"{eight / one:.2f}x",
                         f"{eight / generate:.2f}x" if unquantized else "",
                         f"{s['ttft_p99_busy'] * 1e3:.0f}", f"{s['ttft_p99_idle'] * 1e3:.0f}",
                         f"{s['ttft_p99_busy'] / s['ttft_p99_idle']:.2f}x", others(s)])
        rows.append([i, "ErniePredictor.generate, the 8 prompts as one batch", f"{generate:.1f}", "", "", "", "", "",
                     "", others(figures["generate"])])
    return table(["round", "system", "8 clients (tok/s)", "1 client (tok/s)", "8 / 1", "8 clients / generate",
                  "TTFT p99, 7 decoding (ms)", "TTFT p99, idle (ms)", "busy / idle", "others' CPU"], rows) + [
        "", f"Streaming clients of tools/load_test.py, greedy, {data['max_tokens']} new tokens each (EOS "
            f"suppressed), prompt {data['prompt']!r}; TTFT p99 of {data['probes']} one-token requests sent one after "
            "another" + (f"; vLLM computes in {data['vllm_dtype']} on every core" if data.get("vllm_dtype") else "")
        + ". Each measurement starts on an idle CPU; every round is shown. Others' CPU: the most that processes "
          "other than the benchmark and the servers used of the machine's cores during one of the row's "
          "measurements (other users of a shared machine); a measurement during which they used more than a tenth "
          "is repeated, up to two times (the results file keeps the repeated ones)."]


RENDERERS = {"check": check_table, "bench": bench_table, "bench_vs_transformers": bench_vs_transformers_table,
             "bench_moe": bench_moe_table, "bench_moe_full": bench_moe_full_table,
             "bench_vs_llamacpp": bench_vs_llamacpp_table, "kl_vs_llamacpp": kl_vs_llamacpp_table,
             "bench_serve": bench_serve_table}


def provenance(results: dict, link: str) -> str:
    m, v = results["machine"], results["versions"]
    cpu = f"{m['cpu']} ({m['cores']} cores{', ' + m['simd'] if m.get('simd') else ''}" + (
        f", {m['memory_gib']} GiB)" if m.get("memory_gib") else ")")
    soft = ", ".join(f"{k} {val}" for k, val in v.items())
    return (f"_Measured {results['date']} on {cpu}; {soft}. Command: `{results['command']}`. "
            f"Results: [{Path(link).name}]({link})._")


def render_region(name: str, view: str | None, page: Path) -> str:
    path = RESULTS / f"{name}.json"
    link = os.path.relpath(path, page.parent).replace(os.sep, "/")
    if not path.exists():
        return f"_Not measured yet: {link} does not exist (see docs/benchmarking.md, \"Results files\")._\n"
    results = json.loads(path.read_text(encoding="utf-8"))
    data = results["data"]
    lines = RENDERERS[kind(data)](data, view or "table")
    return "\n".join(lines + ["", provenance(results, link)]) + "\n"


def render(text: str, page: Path) -> str:
    return REGION.sub(lambda m: m[1] + render_region(m["name"], m["view"], page) + m[5], text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  python tools/render_docs.py record bench-0.3b-cpu /tmp/b.json "
                                            "--command \"ernie-paddle bench --model M --json /tmp/b.json\"")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    sub = parser.add_subparsers(dest="action")
    rec = sub.add_parser("record", help="store a tool's --json output as docs/results/NAME.json")
    rec.add_argument("name")
    rec.add_argument("tool_json", type=Path)
    rec.add_argument("--command", required=True, help="the command that wrote TOOL_JSON, as it was run")
    args = parser.parse_args(argv)
    if args.action == "record":
        print(f"wrote {record(args.name, args.tool_json, args.command).relative_to(ROOT)}")
        return 0
    stale = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        new = render(text, page)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new, encoding="utf-8")
    verb = "out of date" if args.check else "rewrote"
    print(f"{verb}: {', '.join(map(str, stale))}" if stale else "every results table is up to date")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
