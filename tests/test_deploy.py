"""`ernie-paddle deploy`: every validation rule with its message, the YAML keys against the engines'
real argument names, and configs/ in sync with what the command writes."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest
import yaml

from ernie_paddle import cli, deploy

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


# name -> (layout, how the stand-in differs from the published 0.3B directory)
MODELS = {
    "pt": ("pt", None),
    "paddle": ("paddle", None),
    "pt-dtype": ("pt", lambda d: edit_config(d, drop=("torch_dtype",), dtype="bfloat16")),
    "pt-both": ("pt", lambda d: edit_config(d, dtype="bfloat16")),
    "pt-neither": ("pt", lambda d: edit_config(d, drop=("torch_dtype",))),
    "paddle-torch_dtype": ("paddle", lambda d: edit_config(d, drop=("dtype",), torch_dtype="bfloat16")),
    "kv16": ("pt", lambda d: edit_config(d, num_key_value_heads=16)),
    "missing-shard": ("pt", split_into_two_shards),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, (layout, change) in MODELS.items():
        render_configs.write_stand_in(root / name, layout)
        if change:
            change(root / name)
    return root


def run(capsys, engine, model: Path, out: Path, *flags):
    code = cli.main(["deploy", engine, "--model", str(model), "--out", str(out), *flags])
    captured = capsys.readouterr()
    return code, captured.err


# (engine, model, flags, the message must contain)
REJECTED = [
    # layout vs engine and device, with the convert command that fixes it
    ("vllm", "paddle", [], "loads only -PT; convert it with `convert paddle2pt"),
    ("vllm-ascend", "paddle", [], "convert paddle2pt"),
    ("fastdeploy", "pt", ["--device", "xpu"], "fastdeploy on xpu loads only -Paddle; convert it with `convert pt2paddle"),
    ("fastdeploy", "pt", ["--device", "dcu"], "convert pt2paddle"),
    ("fastdeploy", "pt", ["--fastdeploy-version", "2.1"], "FastDeploy before 2.2 cannot load the -PT layout"),
    ("fastdeploy", "pt", ["--fastdeploy-version", "3.0"], "--fastdeploy-version 3.0: not a FastDeploy 2.x release"),
    # torch_dtype vs dtype, as FastDeploy reads them
    ("fastdeploy", "pt-both", [], "has both `torch_dtype` and `dtype`, which FastDeploy refuses; keep only `torch_dtype`"),
    ("fastdeploy", "pt-neither", [], "has neither `torch_dtype` nor `dtype`"),
    ("fastdeploy", "paddle-torch_dtype", [], "makes FastDeploy read these -Paddle weights as -PT; rename the key to `dtype`"),
    # tensor parallel vs KV heads
    ("fastdeploy", "pt", ["--tensor-parallel-size", "4"], "--tensor-parallel-size 4: must divide num_key_value_heads (2)"),
    ("vllm", "pt", ["--tensor-parallel-size", "0"], "use one of 1, 2"),
    ("fastdeploy", "kv16", ["--tensor-parallel-size", "16"], "FastDeploy accepts 1 to 8"),
    # FastDeploy's own start checks
    ("fastdeploy", "pt", ["--max-num-seqs", "300"], "--max-num-seqs 300: FastDeploy accepts 1 to 256"),
    ("fastdeploy", "pt", ["--max-num-seqs", "0"], "--max-num-seqs 0: must be positive"),
    ("fastdeploy", "pt", ["--max-model-len", "8"], "--max-model-len 8: FastDeploy needs at least 16"),
    ("fastdeploy", "pt", ["--max-model-len", "64", "--max-num-seqs", "128"],
     "max_num_batched_tokens (64) >= max_num_seqs (128)"),
    ("fastdeploy", "pt", ["--max-num-batched-tokens", "100000", "--max-model-len", "1024", "--max-num-seqs", "8"],
     "at most max_model_len x max_num_seqs = 8192"),
    ("fastdeploy", "pt", ["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5: must be in (0, 1]"),
    ("fastdeploy", "pt", ["--kv-cache-ratio", "1.2"], "--kv-cache-ratio 1.2: must be in (0, 1]"),
    ("vllm", "pt", ["--max-model-len", "200000"], "above the model's max_position_embeddings (131072)"),
    ("vllm", "pt", ["--max-model-len", "0"], "--max-model-len 0: must be positive"),
    # quantization vs device, engine vs device, engine-specific options
    ("fastdeploy", "paddle", ["--device", "xpu", "--quantization", "wint4"],
     "--quantization wint4: not supported by fastdeploy on xpu; choose one of none, wint8"),
    ("vllm", "pt", ["--quantization", "wint8"], "not supported by vllm on gpu"),
    ("fastdeploy", "paddle", ["--device", "npu"], "use `ernie-paddle deploy vllm-ascend`"),
    ("vllm", "pt", ["--device", "xpu"], "use `ernie-paddle deploy fastdeploy --device xpu`"),
    ("vllm", "pt", ["--kv-cache-ratio", "0.5"], "--kv-cache-ratio: a FastDeploy option"),
    # ports
    ("fastdeploy", "pt", ["--port", "9100", "--metrics-port", "9100"],
     "--metrics-port 9100: the same port as --port; every role needs its own port"),
    ("fastdeploy", "pt", ["--port", "9100", "--cache-queue-port", "9101"], "the same port as --metrics-port"),
    ("vllm", "pt", ["--port", "70000"], "--port 70000: not a TCP port"),
    # weights
    ("fastdeploy", "missing-shard", [], "names shard model-00002-of-00002.safetensors, which is missing"),
    ("vllm", "not-there", [], "--model {models}/not-there: no such directory"),
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


def test_quantization_notes_and_hopper_check(capsys, models, tmp_path):
    run(capsys, "fastdeploy", models / "pt", tmp_path / "w4", "--no-port-check", "--quantization", "wint4")
    assert read_engine_config(tmp_path / "w4")["quantization"] == "wint4"
    assert "effectively wint8" in (tmp_path / "w4" / "README.md").read_text()
    run(capsys, "fastdeploy", models / "pt", tmp_path / "fp8", "--no-port-check", "--quantization", "block_wise_fp8")
    assert "needs a Hopper GPU" in (tmp_path / "fp8" / "launch.sh").read_text()


def rendered_configs(engine_file: str):
    return sorted((ROOT / "configs").glob(f"*/*/{engine_file}"))


def check_keys(config: dict, allowed: dict, path: Path):
    for key, value in config.items():
        assert key in allowed, f"{path}: {key!r} is not an argument name of this engine"
        assert isinstance(value, allowed[key]), f"{path}: {key} = {value!r} is not {allowed[key].__name__}"
        assert allowed[key] is not int or not isinstance(value, bool), f"{path}: {key} = {value!r}"


def test_argument_tables_hold_the_engines_real_names():
    """The tables the YAML is checked against, pinned to names read in the engines' own argument
    parsers (FastDeploy args_utils.py: underscored dests; vLLM arg_utils.py: hyphenated flags)."""
    for name in ["max_model_len", "max_num_seqs", "tensor_parallel_size", "kv_cache_ratio", "quantization",
                 "engine_worker_queue_port", "cache_queue_port", "metrics_port", "gpu_memory_utilization"]:
        assert name in deploy.FASTDEPLOY_ARGS, name
    for name in ["max-model-len", "max-num-seqs", "tensor-parallel-size", "gpu-memory-utilization",
                 "enforce-eager", "served-model-name", "dtype"]:
        assert name in deploy.VLLM_ARGS, name
    assert not any("-" in k for k in deploy.FASTDEPLOY_ARGS) and not any("_" in k for k in deploy.VLLM_ARGS)


def test_fastdeploy_yaml_has_only_fastdeploy_argument_names():
    files = rendered_configs("fastdeploy.yaml")
    assert len(files) == 20  # 3 GPU quantizations x 4 models, 2 XPU + DCU + Iluvatar x 2 -Paddle
    for path in files:
        config = yaml.safe_load(path.read_text())
        assert all("-" not in key for key in config)  # FastDeploy ignores hyphenated keys silently
        check_keys(config, deploy.FASTDEPLOY_ARGS, path)


def test_vllm_yaml_has_only_vllm_argument_names():
    files = rendered_configs("vllm.yaml")
    assert len(files) == 4
    for path in files:
        config = yaml.safe_load(path.read_text())
        assert all("_" not in key for key in config)
        check_keys(config, deploy.VLLM_ARGS, path)


def test_every_option_lands_under_a_real_argument_name(capsys, models, tmp_path):
    options = ["--no-port-check", "--max-model-len", "2048", "--max-num-seqs", "16", "--max-num-batched-tokens",
               "4096", "--gpu-memory-utilization", "0.5", "--tensor-parallel-size", "2", "--port", "9300"]
    fastdeploy_only = ["--kv-cache-ratio", "0.5", "--metrics-port", "9400", "--engine-worker-queue-port", "9401",
                       "--cache-queue-port", "9402", "--quantization", "wint8", "--fastdeploy-version", "2.5"]
    for engine, extra, allowed in [("fastdeploy", fastdeploy_only, deploy.FASTDEPLOY_ARGS),
                                   ("vllm", [], deploy.VLLM_ARGS), ("vllm-ascend", [], deploy.VLLM_ARGS)]:
        out = tmp_path / engine
        assert run(capsys, engine, models / "pt", out, *options, *extra)[0] == 0
        config = read_engine_config(out)
        check_keys(config, allowed, out)
        assert {config[k] for k in ("max_num_batched_tokens", "max-num-batched-tokens") if k in config} == {4096}


def test_configs_equal_what_deploy_writes(tmp_path):
    render_configs.render(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(ROOT / "configs"): p.read_text() for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert sorted(fresh) == sorted(committed), "configs/ is stale: run python tools/render_configs.py"
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"configs/ is stale ({stale[:3]}...): run python tools/render_configs.py"
