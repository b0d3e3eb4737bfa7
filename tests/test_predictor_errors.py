"""Bad input to the predictor and `ernie-paddle generate`: one clear line each, no traceback."""

import json
import os
import subprocess
import sys

import pytest

from conftest import save_tiny_pt
from ernie_paddle.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    save_tiny_pt(directory)
    return directory


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ernie-paddle generate: error: ")
    return lines[0]


def generate(capsys, model, *extra):
    return run_cli(capsys, "generate", "--model", str(model), "--prompt", "hi", "--device", "cpu", *extra)


def copy_model(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_directory(capsys, tmp_path):
    code, _, err = generate(capsys, tmp_path / "nope")
    assert code == 2 and "no such model directory" in one_error_line(err)


def test_missing_config(capsys, model_dir, tmp_path):
    broken = copy_model(model_dir, tmp_path / "m", skip={"config.json"})
    code, _, err = generate(capsys, broken)
    assert code == 2 and "config.json: not found" in one_error_line(err)


def test_config_of_another_architecture(capsys, model_dir, tmp_path):
    broken = copy_model(model_dir, tmp_path / "m")
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (broken / "config.json").write_text(json.dumps(cfg))
    code, _, err = generate(capsys, broken)
    assert code == 2 and "'LlamaForCausalLM' is not ERNIE 4.5" in one_error_line(err)


@pytest.mark.parametrize("key, value, message", [
    ("rope_scaling", {"type": "yarn", "factor": 4.0}, 'rope_scaling asks for RoPE type "yarn", which is not supported'),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0}, 'rope_parameters asks for RoPE type "linear"'),
    ("rope_parameters", "default", 'rope_parameters = "default" is not a JSON object'),
    ("use_rmsnorm", False, "use_rmsnorm = false is not supported"),
    ("hidden_size", 2.5, "bad value (hidden_size 2.5 is not an integer)"),
])
def test_config_values_the_model_would_ignore_are_refused(capsys, model_dir, tmp_path, key, value, message):
    broken = copy_model(model_dir, tmp_path / "m")
    cfg = json.loads((broken / "config.json").read_text())
    cfg[key] = value
    (broken / "config.json").write_text(json.dumps(cfg))
    code, _, err = generate(capsys, broken)
    assert code == 2 and message in one_error_line(err)


@pytest.mark.parametrize("key, value", [("rope_scaling", {"rope_type": "default", "rope_theta": 500000.0}),
                                        ("rope_scaling", {}), ("rope_parameters", {"type": "default", "factor": 1.0})])
def test_plain_rope_spelled_any_way_is_accepted(model_dir, tmp_path, key, value):
    from ernie_paddle.config import ErnieConfig
    config = copy_model(model_dir, tmp_path / "m") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    assert ErnieConfig.from_dir(config.parent).kind == "dense"


def test_truncated_safetensors(capsys, model_dir, tmp_path):
    broken = copy_model(model_dir, tmp_path / "m")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, _, err = generate(capsys, broken)
    line = one_error_line(err)
    assert code == 2 and "model.safetensors: truncated safetensors file" in line


def test_tensor_of_wrong_shape(capsys, model_dir, tmp_path):
    broken = copy_model(model_dir, tmp_path / "m")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(cfg))
    code, _, err = generate(capsys, broken)
    line = one_error_line(err)
    assert code == 2 and "mlp.down_proj.weight' has shape [64, 96], but config.json implies [64, 104]" in line


@pytest.mark.parametrize("flag, value, message", [
    ("--device", "tpu", "--device tpu"),
    ("--dtype", "int3", "--dtype int3: unknown dtype"),
    ("--dtype", "bfloat16", "Paddle computes only in float32 on CPU"),
])
def test_bad_device_or_dtype(capsys, model_dir, flag, value, message):
    argv = ["generate", "--model", str(model_dir), "--prompt", "hi", "--device", "cpu", flag, value]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in one_error_line(err)


def test_cli_user_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ernie_paddle", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_import_is_quiet_and_light():
    code = ("import sys, time; t = time.perf_counter(); import ernie_paddle; "
            "assert 'torch' not in sys.modules and 'paddle' not in sys.modules; print(time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert float(proc.stdout) < 0.5


def test_bad_generation_arguments(model_dir):
    from ernie_paddle import ErniePredictor, ErnieError

    pred = ErniePredictor.from_pretrained(model_dir, device="cpu")
    for kwargs, message in [(dict(max_new_tokens=0), "max_new_tokens 0"), (dict(top_p=0.0, temperature=1.0), "top_p 0.0"),
                            (dict(temperature=-1.0), "temperature -1.0")]:
        with pytest.raises(ErnieError, match=message):
            pred.generate([[5, 6]], **kwargs)
    with pytest.raises(ErnieError, match="token id 9999 is outside the vocabulary"):
        pred.generate([[5, 9999]])
    with pytest.raises(ErnieError, match="no tokenizer.model"):
        pred.generate(["text needs a tokenizer"])


def test_without_paddle_one_line_says_what_to_install(tmp_path):
    """GPU/NPU users bring their own Paddle, so the package does not require it: when it is
    missing, the CLI says in one line what to install."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "paddle.py").write_text("raise ImportError('No module named paddle')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "ernie_paddle", "generate", "--model", str(tmp_path),
                           "--prompt", "x", "--device", "cpu"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ernie-paddle generate: error: PaddlePaddle is not installed: pip install 'ernie-paddle[cpu]' for CPU, "
        "or install your GPU/NPU Paddle build (see README.md, 'Set up')"]
