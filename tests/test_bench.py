"""`ernie-paddle bench`: the table and the JSON report on a tiny model (fields only, no timings)."""

import json
import subprocess
import sys

import pytest

from conftest import save_tiny_pt
from ernie_paddle import cpu_ops
from ernie_paddle.cli import main

ROW_FIELDS = {"input_len", "output_len", "batch", "latency_s", "throughput_tps", "tpot_s", "ttft_s",
              "prefill_tps", "bandwidth_gbps"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    save_tiny_pt(directory)
    return directory


def test_table_and_json(model_dir, tmp_path):
    report = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "ernie_paddle", "bench", "--model", str(model_dir), "--device", "cpu",
                          "--input-lens", "3,5", "--output-lens", "2,4", "--batch", "2", "--json", str(report)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == f"wrote {report}"
    lines = run.stdout.splitlines()
    assert lines[1].startswith("| input | output | batch | latency (s) | throughput (tok/s) | TPOT (s) | TTFT (s)")
    cells = [line.split("|")[1:4] for line in lines[3:7]]
    expected = [["3", "2", "2"], ["3", "4", "2"], ["5", "2", "2"], ["5", "4", "2"]]
    assert [[c.strip() for c in row] for row in cells] == expected
    assert any(line.startswith("Paddle's bare matmuls over these weights:") for line in lines)
    assert any(line.startswith("the CPU decoding kernel's bare matmuls:") for line in lines) == cpu_ops.available()
    assert any(line.startswith("peak memory: ") and "GiB" in line for line in lines)

    data = json.loads(report.read_text())
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["batch"] == 2
    # Paddle imported, the process holds some 250 MB whatever the model; a tiny model adds little (this
    # catches a figure in KiB or pages instead of bytes, and a missing one)
    assert data["weight_bytes"] > 0 and 100e6 < data["peak_memory_bytes"] < 4e9
    assert data["load_s"] > 0 and data["matmul_ceiling_tps"] > 0
    assert (data["kernel_ceiling_tps"] or 0) > 0 or not cpu_ops.available()
    assert [(r["input_len"], r["output_len"]) for r in data["rows"]] == [(3, 2), (3, 4), (5, 2), (5, 4)]
    for row in data["rows"]:
        assert set(row) == ROW_FIELDS
        assert row["throughput_tps"] == pytest.approx(row["batch"] * row["output_len"] / row["latency_s"])
        assert 0 < row["ttft_s"] <= row["latency_s"] and row["tpot_s"] > 0


@pytest.mark.skipif(not cpu_ops.available(), reason="bfloat16 weights under float32 need the CPU kernels")
def test_bf16_weights_report_the_bytes_they_read(tmp_path):
    """A bf16 checkpoint is held in bf16: half the weight bytes of its float32 copies; Paddle has no
    bare matmul over them (the kernel's ceiling is printed), and the report says which it measured."""
    save_tiny_pt(tmp_path / "bf16", dtype="bfloat16")
    reports = {}
    for weights in ("auto", "float32"):
        report = tmp_path / f"{weights}.json"
        run = subprocess.run([sys.executable, "-m", "ernie_paddle", "bench", "--model", str(tmp_path / "bf16"),
                              "--device", "cpu", "--input-lens", "3", "--output-lens", "2", "--warmup", "0",
                              "--weight-dtype", weights, "--json", str(report)], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        reports[weights] = json.loads(report.read_text()), run.stdout
    (held, held_out), (copies, copies_out) = reports["auto"], reports["float32"]
    assert held["weight_dtype"] == "bfloat16" and copies["weight_dtype"] == "float32"
    assert held["weight_bytes"] < 0.52 * copies["weight_bytes"]  # the norms stay float32
    assert held["matmul_ceiling_tps"] is None and copies["matmul_ceiling_tps"] > 0
    assert held["kernel_ceiling_tps"] > 0
    assert "Paddle's bare matmuls: none over bfloat16 weights in float32" in held_out
    assert "Paddle's bare matmuls over these weights:" in copies_out


@pytest.mark.parametrize("flag, value, message", [
    ("--input-lens", "7,x", "--input-lens '7,x': expected positive integers"),
    ("--output-lens", "0", "--output-lens '0': expected positive integers"),
    ("--batch", "0", "--batch 0: must be at least 1"),
    ("--output-lens", "600", "exceed the model's 512 positions"),
    ("--json", "{tmp}", "cannot write this file (Is a directory)"),
    ("--json", "{tmp}/missing/b.json", "cannot write this file (No such file or directory)"),
    ("--json", "{file}/b.json", "cannot write this file (Not a directory)"),
    ("--json", "/proc/b.json", "cannot write this file"),
])
def test_bad_options_fail_in_one_line(capsys, tmp_path, model_dir, flag, value, message):
    (tmp_path / "a-file").touch()
    (tmp_path / "a-link").symlink_to(tmp_path / "nowhere.json")
    value = value.format(tmp=tmp_path, file=tmp_path / "a-file")
    json_link = [] if flag == "--json" else ["--json", str(tmp_path / "a-link")]  # a dangling link: nothing made
    code = main(["bench", "--model", str(model_dir), "--device", "cpu", flag, value, *json_link])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ernie-paddle bench: error: ")
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-link"]  # nothing left by the check


def test_moe_model_reports_the_bytes_of_the_routed_experts(tmp_path):
    """A MoE step reads top_k of the experts: the bandwidth counts those bytes, not all the weights."""
    from conftest import save_tiny_moe_pt

    save_tiny_moe_pt(tmp_path / "moe", moe_num_experts=8, moe_k=2, moe_intermediate_size=32)
    report = tmp_path / "moe.json"
    run = subprocess.run([sys.executable, "-m", "ernie_paddle", "bench", "--model", str(tmp_path / "moe"),
                          "--device", "cpu", "--input-lens", "3", "--output-lens", "4", "--json", str(report)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "GB read per token (the routed experts only)" in run.stdout
    data = json.loads(report.read_text())
    experts = 3 * 64 * 32 * 4 * 8  # MoE layer 1 of 2: up_gate [64, 64] + down [64, 32] of 8 experts, float32
    assert data["weight_bytes"] - data["step_bytes"] == experts * 6 // 8  # 6 of 8 experts not read
    assert data["matmul_ceiling_tps"] > 0 and ((data["kernel_ceiling_tps"] or 0) > 0 or not cpu_ops.available())


def test_bench_moe_rounds_run_each_side_in_a_fresh_process(tmp_path, monkeypatch):
    """tools/bench_moe.py: our decode and transformers' each load, warm up and time 5 tokens in a process
    of their own, which reports its peak RSS; a round that fails says which system and checkpoint."""
    import importlib.util
    from pathlib import Path

    from conftest import save_tiny_moe_pt

    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_moe.py"
    spec = importlib.util.spec_from_file_location("bench_moe", tool)
    bench_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_moe)
    monkeypatch.setattr("ernie_paddle.bench.wait_for_idle_cpu", lambda: 0.0)  # no waiting for a quiet machine here
    save_tiny_moe_pt(tmp_path / "moe")
    for system in ("ernie-paddle", "transformers"):
        round_ = bench_moe.fresh_process_round(system, tmp_path / "moe", 5)
        assert round_["system"] == system and round_["new_tokens"] == 5 and round_["decode_tps"] > 0
        assert round_["weight_bytes"] > 0 and 100e6 < round_["peak_rss_bytes"] < 4e9  # as in test_table_and_json
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_bytes((tmp_path / "moe" / "config.json").read_bytes())
    with pytest.raises(SystemExit, match=r"the transformers round on \S+no-weights failed \(exit 1\)"):
        bench_moe.fresh_process_round("transformers", tmp_path / "no-weights", 5)
