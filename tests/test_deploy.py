"""`ernie-paddle deploy`: every validation rule with its message, the YAML keys against the engines'
real argument names, and configs/ in sync with what the command writes."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from ernie_paddle import cli, deploy
from ernie_paddle.deploy_rules import VLLM_ARGS

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("render_configs", ROOT / "tools" / "render_configs.py")
render_configs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_configs)


def edit_config(directory: Path, drop=(), **values):
    file = directory / "config.json"
    raw = {k: v for k, v in json.loads(file.read_text()).items() if k not in drop}
    file.write_text(json.dumps({**raw, **values}))


def split_into_two_shards(directory: Path):
    """Name two shards in an index, keep only the first: an incomplete download."""
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def write_tokenizer_config(directory: Path, model_max_length: int):
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": model_max_length}))


# name -> (layout, how the stand-in differs from the published 0.3B directory)
MODELS = {
    "pt": ("pt", None),
    "paddle": ("paddle", None),
    "pt-dtype": ("pt", lambda d: edit_config(d, drop=("torch_dtype",), dtype="bfloat16")),
    "pt-both": ("pt", lambda d: edit_config(d, dtype="bfloat16")),
    "pt-neither": ("pt", lambda d: edit_config(d, drop=("torch_dtype",))),
    "paddle-torch_dtype": ("paddle", lambda d: edit_config(d, drop=("dtype",), torch_dtype="bfloat16")),
    "paddle-transformers5": ("paddle", lambda d: edit_config(d, transformers_version="5.0.0")),
    "kv16": ("paddle", lambda d: edit_config(d, num_key_value_heads=16)),
    "pt-tokenizer-8k": ("pt", lambda d: write_tokenizer_config(d, 8192)),
    "missing-shard": ("pt", split_into_two_shards),
}
MOE = {"moe-pt": "pt", "moe-paddle": "paddle"}  # the 21B-A3B shape


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, (layout, change) in MODELS.items():
        render_configs.write_stand_in(root / name, layout)
        if change:
            change(root / name)
    for name, layout in MOE.items():
        render_configs.write_stand_in(root / name, layout, render_configs.ERNIE_21B_A3B)
    return root


def run(capsys, engine, model: Path, out: Path, *flags):
    code = cli.main(["deploy", engine, "--model", str(model), "--out", str(out), *flags])
    captured = capsys.readouterr()
    return code, captured.err


def fastdeploy(version: str, *flags) -> tuple:
    return ("fastdeploy", "--fastdeploy-version", version, *flags)


# (engine, model, flags, the message must contain)
REJECTED = [
    # layout vs engine, device and release, with the convert command that fixes it
    ("vllm", "paddle", [], "vllm loads only -PT; convert it with `ernie-paddle convert paddle2pt"),
    ("vllm-ascend", "paddle", [], "`ernie-paddle convert paddle2pt"),
    ("fastdeploy", "pt", ["--device", "dcu"],
     "FastDeploy 2.3 on dcu loads only -Paddle; or convert it with `ernie-paddle convert pt2paddle"),
    ("fastdeploy", "pt", ["--fastdeploy-version", "3.0"], "--fastdeploy-version 3.0: not a FastDeploy 2.x release"),
    # torch_dtype vs dtype, as FastDeploy reads them
    ("fastdeploy", "pt-both", [], "has both `torch_dtype` and `dtype`, which FastDeploy refuses; keep only `torch_dtype`"),
    ("fastdeploy", "pt-neither", [], "has neither `torch_dtype` nor `dtype`"),
    ("fastdeploy", "paddle-torch_dtype", [], "makes FastDeploy read these -Paddle weights as -PT; rename the key to `dtype`"),
    # tensor parallel
    ("vllm", "pt", ["--tensor-parallel-size", "0"], "use one of 1, 2, 4, 8, 16"),
    ("vllm", "pt", ["--tensor-parallel-size", "3"], "must divide num_attention_heads (16)"),
    # FastDeploy's own start checks
    ("fastdeploy", "pt", ["--max-num-seqs", "300"], "--max-num-seqs 300: FastDeploy accepts 1 to 256"),
    ("fastdeploy", "pt", ["--max-num-seqs", "0"], "--max-num-seqs 0: must be positive"),
    ("fastdeploy", "pt", ["--max-model-len", "8"], "--max-model-len 8: FastDeploy needs at least 16"),
    ("fastdeploy", "pt", ["--max-num-batched-tokens", "100000", "--max-model-len", "1024", "--max-num-seqs", "8"],
     "at most max_model_len x max_num_seqs = 8192"),
    ("fastdeploy", "pt", ["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5: must be in (0, 1]"),
    ("fastdeploy", "pt", ["--kv-cache-ratio", "1.2"], "--kv-cache-ratio 1.2: must be in (0, 1]"),
    ("vllm", "pt", ["--max-model-len", "200000"], "above the model's max_position_embeddings (131072)"),
    ("vllm", "pt", ["--max-model-len", "0"], "--max-model-len 0: must be positive"),
    # quantization vs device, engine vs device, engine-specific options
    ("fastdeploy", "paddle", ["--device", "xpu", "--quantization", "wint4"],
     "--quantization wint4: not supported by fastdeploy on xpu for dense models; choose one of none, wint8"),
    ("vllm", "pt", ["--quantization", "wint8"], "not supported by vllm on gpu"),
    ("vllm", "pt", ["--device", "cpu", "--quantization", "wint8"], "not supported by vllm on cpu"),
    ("fastdeploy", "paddle", ["--device", "npu"], "use `ernie-paddle deploy vllm-ascend`"),
    ("fastdeploy", "paddle", ["--device", "cpu"], "use `ernie-paddle deploy vllm --device cpu`"),
    ("vllm", "pt", ["--device", "xpu"], "use `ernie-paddle deploy fastdeploy --device xpu`"),
    ("vllm", "pt", ["--kv-cache-ratio", "0.5"], "--kv-cache-ratio: not a vllm option"),
    ("fastdeploy", "paddle", ["--dtype", "float32"], "--dtype: not a fastdeploy option"),
    # ports
    ("fastdeploy", "pt", ["--port", "9100", "--metrics-port", "9100"],
     "--metrics-port 9100: the same port as --port; every role needs its own port"),
    ("fastdeploy", "pt", ["--port", "9100", "--cache-queue-port", "9101"], "the same port as --metrics-port"),
    ("vllm", "pt", ["--port", "70000"], "--port 70000: not a TCP port"),
    # weights
    ("fastdeploy", "missing-shard", [], "names shard model-00002-of-00002.safetensors, which is missing"),
    ("vllm", "not-there", [], "--model {models}/not-there: no such directory"),
    ("vllm", "pt/config.json", [], "--model {models}/pt/config.json: not a directory; pass the model's directory"),
]


@pytest.mark.parametrize("engine,model,flags,message", REJECTED,
                         ids=[f"{e}-{m}-{' '.join(f)}" for e, m, f, _ in REJECTED])
def test_rejected_with_one_clear_line_and_nothing_written(capsys, models, tmp_path, engine, model, flags, message):
    out = tmp_path / "deployment"
    code, err = run(capsys, engine, models / model, out, "--no-port-check", *flags)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ernie-paddle deploy: error: ")
    assert message.format(models=models) in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# The findings of the engine-rules audit (spec/deploy-engine-rules.md), each per release:
# (model, deploy args, None when the engine accepts it, else what the one error line says).
PER_RELEASE = {
    "default max_num_batched_tokens": [
        # 2.3+ on GPU takes 8192 unless told: more than 1024 x 4, so FastDeploy asserts at start
        ("paddle", fastdeploy("2.3", "--max-model-len", "1024", "--max-num-seqs", "4"),
         "takes 8192 when --max-num-batched-tokens is not given); pass --max-num-batched-tokens 4096 or less"),
        ("paddle", fastdeploy("2.2", "--max-model-len", "1024", "--max-num-seqs", "4"), None),  # 2048
        ("paddle", fastdeploy("2.1", "--max-model-len", "1024", "--max-num-seqs", "4"), None),  # max_model_len
        ("paddle", fastdeploy("2.3", "--max-model-len", "64", "--max-num-seqs", "128"), None),  # 8192 <= 64 x 128
        ("paddle", fastdeploy("2.1", "--max-model-len", "64", "--max-num-seqs", "128"),
         "max_num_batched_tokens (64) >= max_num_seqs (128)"),
        ("paddle", fastdeploy("2.3", "--device", "dcu", "--max-model-len", "64", "--max-num-seqs", "128"),
         "FastDeploy 2.3 on dcu needs max_num_batched_tokens (64) >= max_num_seqs (128)"),
    ],
    "max_num_batched_tokens >= max_model_len without chunked prefill, >= block_size with it": [
        ("paddle", fastdeploy("2.0", "--max-num-batched-tokens", "4096"),
         "FastDeploy 2.0 on gpu runs without chunked prefill, so max_num_batched_tokens (4096) must be at least "
         "max_model_len (32768)"),
        ("paddle", fastdeploy("2.3", "--max-num-batched-tokens", "4096"), None),
        ("paddle", fastdeploy("2.3", "--device", "dcu", "--max-num-batched-tokens", "8192"), "without chunked prefill"),
        ("paddle", fastdeploy("2.2", "--device", "dcu", "--max-num-batched-tokens", "8192"), None),  # chunked
        ("paddle", fastdeploy("2.4", "--device", "iluvatar", "--max-num-batched-tokens", "8192"), "without chunked prefill"),
        ("paddle", fastdeploy("2.5", "--device", "iluvatar", "--max-num-batched-tokens", "8192"), None),
        ("paddle", fastdeploy("2.3", "--max-num-batched-tokens", "32", "--max-num-seqs", "8"),
         "prefills in chunks, so max_num_batched_tokens (32) must be at least block_size (64)"),
        # XPU 2.3: the V1 scheduler without chunked prefill, so neither lower bound applies
        ("paddle", fastdeploy("2.3", "--device", "xpu", "--max-num-batched-tokens", "32", "--max-num-seqs", "8"), None),
    ],
    "vLLM: max_num_batched_tokens >= max_num_seqs, max_model_len within model_max_length": [
        ("pt", ("vllm", "--max-num-batched-tokens", "32", "--max-num-seqs", "64"),
         "--max-num-batched-tokens 32: vLLM needs at least max_num_seqs (64)"),
        ("pt-tokenizer-8k", ("vllm", "--max-model-len", "16384"),
         "--max-model-len 16384: above tokenizer_config.json's model_max_length (8192)"),
        ("pt-tokenizer-8k", ("fastdeploy", "--max-model-len", "16384"), None),
    ],
    "tensor parallel": [
        ("paddle", fastdeploy("2.1", "--tensor-parallel-size", "4"),
         "--tensor-parallel-size 4: must divide num_key_value_heads (2) in FastDeploy 2.1; use one of 1, 2"),
        ("paddle", fastdeploy("2.2", "--tensor-parallel-size", "4"), None),
        ("paddle", fastdeploy("2.3", "--tensor-parallel-size", "8"), None),
        ("pt", ("vllm", "--tensor-parallel-size", "4"), None),
        ("pt", ("vllm", "--tensor-parallel-size", "8"), None),
        ("kv16", fastdeploy("2.0", "--tensor-parallel-size", "16"), "FastDeploy 2.0 accepts 1 to 8"),
        ("kv16", fastdeploy("2.3", "--tensor-parallel-size", "16"), "runs at most 8 ranks per gpu node"),
        ("kv16", fastdeploy("2.3", "--device", "iluvatar", "--tensor-parallel-size", "16",
                            "--max-model-len", "8192"), None),
        ("moe-pt", ("vllm", "--tensor-parallel-size", "4"), None),
        ("moe-pt", ("vllm", "--tensor-parallel-size", "8"), "must divide num_attention_heads (20)"),
    ],
    "devices and layouts per release": [
        ("paddle", fastdeploy("2.0", "--device", "dcu"),
         "--device dcu: FastDeploy 2.0 has no dcu serving; target --fastdeploy-version 2.1 or later"),
        ("paddle", fastdeploy("2.0", "--device", "iluvatar"), "FastDeploy 2.0 has no iluvatar serving"),
        ("paddle", fastdeploy("2.1", "--device", "dcu"), None),
        ("pt", fastdeploy("2.1"), "FastDeploy 2.1 on gpu loads only -Paddle; FastDeploy 2.2 or later reads -PT there"),
        ("pt", fastdeploy("2.2", "--device", "xpu"), "FastDeploy 2.3 or later reads -PT there"),
        ("pt", fastdeploy("2.3", "--device", "xpu"), None),
        ("pt", fastdeploy("2.3", "--device", "iluvatar", "--max-model-len", "8192"), "FastDeploy 2.4 or later"),
        ("pt", fastdeploy("2.4", "--device", "iluvatar", "--max-model-len", "8192"), None),
        ("paddle-transformers5", fastdeploy("2.5"),
         "`dtype` with transformers_version 5.0.0 makes FastDeploy 2.5 read these -Paddle weights as -PT"),
        ("paddle-transformers5", fastdeploy("2.4"), None),
        ("moe-paddle", fastdeploy("2.3", "--device", "xpu", "--quantization", "wint4"), None),
        ("pt", ("vllm", "--device", "cpu"), None),
    ],
}
CASES = [(finding, *case) for finding, cases in PER_RELEASE.items() for case in cases]


@pytest.mark.parametrize("finding,model,argv,message", CASES,
                         ids=[f"{m}-{' '.join(a)}" for _, m, a, _ in CASES])
def test_rules_follow_the_engine_release(capsys, models, tmp_path, finding, model, argv, message):
    engine, *flags = argv
    code, err = run(capsys, engine, models / model, tmp_path / "d", "--no-port-check", *flags)
    if message is None:
        assert code == 0, f"{finding}: {err}"
    else:
        assert code == 2 and message in err, f"{finding}: {err or 'accepted'}"


@pytest.mark.parametrize("version", list(deploy.FASTDEPLOY))
def test_yaml_keys_and_readme_follow_the_release(capsys, models, tmp_path, version):
    """served_model_name (2.2+) and load_choices (where the v1 loader runs, 2.2+ on GPU) are written only
    where the release has them; every key is an argument of that release."""
    release = deploy.FASTDEPLOY[version]
    assert run(capsys, "fastdeploy", models / "paddle", tmp_path / "d", "--no-port-check",
               "--fastdeploy-version", version)[0] == 0
    config = read_engine_config(tmp_path / "d")
    check_keys(config, release.args, tmp_path / "d")
    has_name = version >= "2.2"
    assert ("served_model_name" in config) is has_name
    assert ("served as" in (tmp_path / "d" / "README.md").read_text()) is has_name
    assert ("load_choices" in config) is (version >= "2.2")


@pytest.mark.parametrize("version,kind,note", [
    ("2.0", "paddle", "int4 weights (FastDeploy 2.0 applies wint4 to dense models as asked)"),
    ("2.1", "paddle", "effectively wint8"), ("2.3", "paddle", "effectively wint8"),
    ("2.0", "moe-paddle", "expert weights int4, the other layers int8"),
    ("2.3", "moe-paddle", "expert weights int4, the other layers int8"),
])
def test_wint4_note_per_release_and_kind(capsys, models, tmp_path, version, kind, note):
    assert run(capsys, "fastdeploy", models / kind, tmp_path / "d", "--no-port-check", "--fastdeploy-version",
               version, "--quantization", "wint4")[0] == 0
    assert read_engine_config(tmp_path / "d")["quantization"] == "wint4"
    assert note in (tmp_path / "d" / "README.md").read_text()


def stub(directory: Path, name: str, body: str):
    """A stand-in for a tool that is not installable here (nvidia-smi, FastDeploy's python)."""
    directory.mkdir(exist_ok=True)
    (directory / name).write_text("#!/usr/bin/env bash\n" + body)
    (directory / name).chmod(0o755)


def launch(script: Path, bin_dir: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(script)], env=environment, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("version,device", [(v, "gpu") for v in deploy.FASTDEPLOY] + [("2.0", "xpu"), ("2.1", "xpu")])
def test_preset_visible_devices_must_match_tp_on_2_0_and_2_1(capsys, models, tmp_path, version, device):
    """2.0 counts CUDA_VISIBLE_DEVICES on every device, 2.1 XPU_VISIBLE_DEVICES on XPU; 2.2+ count nothing."""
    assert run(capsys, "fastdeploy", models / "paddle", tmp_path / "d", "--no-port-check",
               "--fastdeploy-version", version, "--device", device)[0] == 0
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "python", "echo engine started\n")
    counted = {("2.0", "xpu"): "CUDA_VISIBLE_DEVICES", ("2.1", "xpu"): "XPU_VISIBLE_DEVICES"}.get(
        (version, device), "CUDA_VISIBLE_DEVICES")
    started = launch(tmp_path / "d" / "launch.sh", bin_dir, **{counted: "0,1,2,3"})
    if version in ("2.0", "2.1"):
        assert started.returncode == 2
        assert f"FastDeploy {version} needs {counted} to list exactly 1 device(s)" in started.stderr
        assert launch(tmp_path / "d" / "launch.sh", bin_dir, **{counted: "3"}).stdout == "engine started\n"
    else:
        assert started.stdout == "engine started\n"


def test_block_wise_fp8_gate_reads_the_selected_gpus(capsys, models, tmp_path):
    assert run(capsys, "fastdeploy", models / "pt", tmp_path / "d", "--no-port-check",
               "--quantization", "block_wise_fp8")[0] == 0
    bin_dir = tmp_path / "bin"
    # GPU 0 is an A100 (8.0), GPU 1 an H100 (9.0); `-i` selects, as nvidia-smi does.
    stub(bin_dir, "nvidia-smi", 'ids=0,1; [ "$1" = -i ] && ids=$2\n'
                                'for i in ${ids//,/ }; do [ "$i" = 0 ] && echo 8.0 || echo 9.0; done\n')
    stub(bin_dir, "python", "echo engine started\n")
    script = tmp_path / "d" / "launch.sh"
    assert launch(script, bin_dir, CUDA_VISIBLE_DEVICES="1").stdout == "engine started\n"
    refused = launch(script, bin_dir, CUDA_VISIBLE_DEVICES="1,0")
    assert refused.returncode == 2 and "needs Hopper GPUs (compute capability 9.x), found 8.0" in refused.stderr


def test_device_environment_in_launch_sh(capsys, models, tmp_path):
    run(capsys, "fastdeploy", models / "paddle", tmp_path / "i", "--no-port-check", "--device", "iluvatar")
    iluvatar = (tmp_path / "i" / "launch.sh").read_text()
    for line in ['export LD_PRELOAD="${LD_PRELOAD:-/usr/local/corex/lib64/libcuda.so.1}"',
                 'export FD_SAMPLING_CLASS="${FD_SAMPLING_CLASS:-rejection}"',
                 'export PADDLE_XCCL_BACKEND="${PADDLE_XCCL_BACKEND:-iluvatar_gpu}"']:
        assert line in iluvatar
    assert read_engine_config(tmp_path / "i")["block_size"] == 16
    # vLLM-Ascend sets PYTORCH_NPU_ALLOC_CONF itself and asserts it unset with --enable-sleep-mode.
    run(capsys, "vllm-ascend", models / "pt", tmp_path / "a", "--no-port-check")
    assert "PYTORCH_NPU_ALLOC_CONF" not in (tmp_path / "a" / "launch.sh").read_text()
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "vllm-ascend 0.18.0" in readme and "torch-npu 2.9.0, CANN 8.5.1" in readme


class Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()

    def do_POST(self):
        body = b'{"choices": [{"text": " Paris."}]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,passes", [(200, True), (304, False), (503, False)])
def test_smoke_test_needs_health_200(tmp_path, status, passes):
    """FastDeploy answers /health with 304 when its workers are dead: not ready (curl -f would pass it)."""
    handler = type("Handler", (Health,), {"status": status})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        script = tmp_path / "smoke_test.sh"
        script.write_text(deploy.smoke_test_script(server.server_address[1], "m"))
        result = subprocess.run(["bash", str(script)], env={**os.environ, "TIMEOUT": "2"},
                                capture_output=True, text=True, timeout=60)
        server.shutdown()
    assert (result.returncode == 0) is passes
    assert ("smoke test passed" in result.stdout) is passes


def test_vllm_cpu_sizes_its_kv_cache_in_bytes(capsys, models, tmp_path):
    assert run(capsys, "vllm", models / "pt", tmp_path / "c", "--no-port-check", "--device", "cpu",
               "--max-model-len", "1024", "--max-num-seqs", "2")[0] == 0
    config = read_engine_config(tmp_path / "c")
    # 2 (K and V) x 18 layers x 2 KV heads x 128 x 4 bytes (float32) per token, 1024 x 2 tokens
    assert config["kv-cache-memory-bytes"] == 2 * 18 * 2 * 128 * 4 * 1024 * 2
    assert config["dtype"] == "float32" and "gpu-memory-utilization" not in config
    assert "VISIBLE_DEVICES" not in (tmp_path / "c" / "launch.sh").read_text()
    assert run(capsys, "vllm", models / "pt", tmp_path / "r", "--no-port-check", "--device", "cpu",
               "--gpu-memory-utilization", "0.2", "--dtype", "bfloat16")[0] == 0
    config = read_engine_config(tmp_path / "r")
    assert config["gpu-memory-utilization"] == 0.2 and "kv-cache-memory-bytes" not in config
    assert config["dtype"] == "bfloat16"


def test_busy_port_is_found_with_a_real_bind(capsys, models, tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run(capsys, "vllm", models / "pt", tmp_path / "d", "--port", str(port))
    assert code == 2
    assert f"--port {port}: already in use on this machine" in err


def test_existing_out_needs_overwrite(capsys, models, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "old").write_text("x")
    code, err = run(capsys, "vllm", models / "pt", out, "--no-port-check")
    assert code == 2 and "already exists; choose a new directory or pass --overwrite" in err
    assert run(capsys, "vllm", models / "pt", out, "--no-port-check", "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "launch.sh", "smoke_test.sh", "vllm.yaml"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging directory left behind


def read_engine_config(out: Path) -> dict:
    [config] = [p for p in out.iterdir() if p.suffix == ".yaml"]
    return yaml.safe_load(config.read_text())


def test_pt_config_with_dtype_key_gets_fd_for_torch_model_format(capsys, models, tmp_path):
    """transformers 5 saves -PT configs with `dtype`: FastDeploy needs the variable to read them as torch."""
    code, _ = run(capsys, "fastdeploy", models / "pt-dtype", tmp_path / "a", "--no-port-check")
    assert code == 0
    assert "export FD_FOR_TORCH_MODEL_FORMAT=1\n" in (tmp_path / "a" / "launch.sh").read_text()
    assert "FD_FOR_TORCH_MODEL_FORMAT=1" in (tmp_path / "a" / "README.md").read_text()
    run(capsys, "fastdeploy", models / "pt", tmp_path / "b", "--no-port-check")
    assert "FD_FOR_TORCH_MODEL_FORMAT" not in (tmp_path / "b" / "launch.sh").read_text()


def test_defaults_per_engine(capsys, models, tmp_path):
    run(capsys, "vllm", models / "pt", tmp_path / "v", "--no-port-check")
    vllm = read_engine_config(tmp_path / "v")
    assert vllm["max-model-len"] == 4096  # bounded, not the model's 131072
    assert vllm["port"] == 8000 and vllm["served-model-name"] == "pt"
    run(capsys, "vllm", models / "pt", tmp_path / "v256", "--no-port-check", "--max-model-len", "256")
    assert read_engine_config(tmp_path / "v256")["max-model-len"] == 256
    run(capsys, "fastdeploy", models / "paddle", tmp_path / "f", "--no-port-check", "--port", "9000",
        "--tensor-parallel-size", "2")
    fastdeploy = read_engine_config(tmp_path / "f")
    assert [fastdeploy[k] for k in deploy.FASTDEPLOY_PORTS] == [9000, 9001, 9002, 9003]
    assert fastdeploy["tensor_parallel_size"] == 2 and "quantization" not in fastdeploy
    launch = (tmp_path / "f" / "launch.sh").read_text()
    assert 'export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1}"' in launch
    assert f'MODEL="${{MODEL:-{(models / "paddle").resolve()}}}"' in launch


def rendered_configs(engine_file: str):
    return sorted((ROOT / "configs").glob(f"*/*/{engine_file}"))


def check_keys(config: dict, allowed: dict, path: Path):
    for key, value in config.items():
        assert key in allowed, f"{path}: {key!r} is not an argument name of this engine release"
        assert isinstance(value, allowed[key]), f"{path}: {key} = {value!r} is not {allowed[key].__name__}"
        assert allowed[key] is not int or not isinstance(value, bool), f"{path}: {key} = {value!r}"


def test_argument_tables_hold_the_engines_real_names():
    """The tables the YAML is checked against, pinned to names read in the engines' own argument
    parsers (FastDeploy args_utils.py: underscored dests, some only from a release on; vLLM
    arg_utils.py: hyphenated flags)."""
    for release in deploy.FASTDEPLOY.values():
        for name in ["max_model_len", "max_num_seqs", "tensor_parallel_size", "kv_cache_ratio", "quantization",
                     "engine_worker_queue_port", "cache_queue_port", "metrics_port", "gpu_memory_utilization"]:
            assert name in release.args, (release.version, name)
        assert not any("-" in k for k in release.args)
    assert "load_choices" not in deploy.FASTDEPLOY["2.0"].args and "load_choices" in deploy.FASTDEPLOY["2.1"].args
    assert "served_model_name" not in deploy.FASTDEPLOY["2.1"].args
    assert "served_model_name" in deploy.FASTDEPLOY["2.2"].args
    for name in ["max-model-len", "max-num-seqs", "tensor-parallel-size", "gpu-memory-utilization",
                 "kv-cache-memory-bytes", "enforce-eager", "served-model-name", "dtype"]:
        assert name in VLLM_ARGS, name
    assert not any("_" in k for k in VLLM_ARGS)


def test_fastdeploy_yaml_has_only_fastdeploy_argument_names():
    files = rendered_configs("fastdeploy.yaml")
    # 0.3B: 3 GPU quantizations x 4 models, 2 XPU x 4 (-PT loads on XPU from 2.3), DCU + Iluvatar x 2 -Paddle;
    # 21B-A3B: 4 GPU + 2 XPU recipes x 2 layouts, Iluvatar x -Paddle
    assert len(files) == 12 + 8 + 4 + 13
    release = deploy.FASTDEPLOY[deploy.DEFAULT_FASTDEPLOY_VERSION]
    for path in files:
        config = yaml.safe_load(path.read_text())
        assert all("-" not in key for key in config)  # FastDeploy ignores hyphenated keys silently
        check_keys(config, release.args, path)


def test_vllm_yaml_has_only_vllm_argument_names():
    files = rendered_configs("vllm.yaml")
    assert len(files) == 3 * 2 + 2  # 0.3B -PT: gpu, cpu, npu; 21B-A3B-PT: gpu, npu
    for path in files:
        config = yaml.safe_load(path.read_text())
        assert all("_" not in key for key in config)
        check_keys(config, VLLM_ARGS, path)


@pytest.mark.parametrize("version", list(deploy.FASTDEPLOY))
def test_every_option_lands_under_a_real_argument_name(capsys, models, tmp_path, version):
    options = ["--no-port-check", "--max-model-len", "2048", "--max-num-seqs", "16", "--max-num-batched-tokens",
               "4096", "--gpu-memory-utilization", "0.5", "--tensor-parallel-size", "2", "--port", "9300"]
    fastdeploy_only = ["--kv-cache-ratio", "0.5", "--metrics-port", "9400", "--engine-worker-queue-port", "9401",
                       "--cache-queue-port", "9402", "--quantization", "wint8", "--fastdeploy-version", version]
    for engine, extra, allowed in [("fastdeploy", fastdeploy_only, deploy.FASTDEPLOY[version].args),
                                   ("vllm", ["--dtype", "bfloat16"], VLLM_ARGS), ("vllm-ascend", [], VLLM_ARGS)]:
        out = tmp_path / engine
        assert run(capsys, engine, models / "paddle" if engine == "fastdeploy" else models / "pt", out,
                   *options, *extra)[0] == 0
        config = read_engine_config(out)
        check_keys(config, allowed, out)
        assert {config[k] for k in ("max_num_batched_tokens", "max-num-batched-tokens") if k in config} == {4096}


def test_configs_equal_what_deploy_writes(tmp_path):
    stale = render_configs.stale()
    assert not stale, f"configs/ is stale ({stale[:3]}...): run python tools/render_configs.py"
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # and the check sees a change, a loss, an addition
    changed, lost = sorted((tmp_path / "configs").rglob("launch.sh"))[:2]
    changed.write_text(changed.read_text() + "\n")
    lost.unlink()
    (tmp_path / "configs" / "extra.md").write_text("")
    names = {str(p.relative_to(tmp_path / "configs")) for p in (changed, lost)} | {"extra.md"}
    assert set(render_configs.stale(tmp_path / "configs")) == names
