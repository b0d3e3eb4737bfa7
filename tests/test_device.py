"""Device resolution, dtype policy, import-time flags and the NPU fused-op probe, on the CPU.

The real NPU code paths (a plugin loaded at import) are in test_npu.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_paddle import ErnieError, ErniePredictor, device

paddle = device.import_paddle()
F = paddle.nn.functional


@pytest.fixture
def places(monkeypatch):
    """Pretend Paddle sees the given places; record what resolve() makes current."""
    current = []

    def pretend(*listed):
        monkeypatch.setattr(device, "available", lambda: [*listed, "cpu"])
        monkeypatch.setattr(paddle, "set_device", current.append)
        monkeypatch.setattr(paddle, "set_flags", lambda flags: current.append(flags))
        monkeypatch.setattr(paddle.device, "get_device", lambda: {"npu": "npu:0"}.get(current[-1], current[-1]))
        return current
    return pretend


def test_auto_is_cpu_without_a_plugin():
    if device.available() != ["cpu"]:
        pytest.skip(f"this Paddle sees more than the CPU: {device.available()}")
    assert device.resolve("auto") == "cpu" and paddle.device.get_device() == "cpu"
    assert device.resolve(" CPU ") == "cpu"


def test_available_orders_gpu_then_npu_then_other_custom_devices(monkeypatch):
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(paddle.device, "get_available_custom_device", lambda: ["mlu:0", "npu:0", "npu:1", "intel_hpu"])
    assert device.available() == ["gpu:0", "gpu:1", "npu:0", "npu:1", "mlu:0", "intel_hpu:0", "cpu"]


@pytest.mark.parametrize("listed, expected", [(["gpu:0", "npu:0"], "gpu:0"), (["npu:0", "npu:1"], "npu:0"),
                                              (["mlu:0"], "mlu:0"), ([], "cpu")])
def test_auto_takes_the_first_available(places, listed, expected):
    places(*listed)
    assert device.resolve("auto") == expected


def test_custom_devices_run_without_stride_kernels(places):
    current = places("npu:0", "npu:1")
    assert device.resolve("npu") == "npu:0"
    assert device.resolve("NPU:1") == "npu:1"
    assert current == [{"FLAGS_use_stride_kernel": False}, "npu", {"FLAGS_use_stride_kernel": False}, "npu:1"]


@pytest.mark.parametrize("requested, hint", [("npu:5", ""), ("tpu", ""), ("cpu:0", ""), ("gpu", " (gpu: install"),
                                             ("mlu:0", "")])
def test_unavailable_device_is_one_clear_line(places, requested, hint):
    places("npu:0", "npu:1")
    with pytest.raises(ErnieError) as e:
        device.resolve(requested)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"--device {requested}: not available here; choose from auto, npu:0, npu:1, cpu{hint}")


def test_npu_without_the_plugin_says_what_to_install(places):
    places()
    with pytest.raises(ErnieError, match=r"--device npu:0: not available here; choose from auto, cpu "
                                         r"\(npu: install paddle-custom-npu, see docs/npu.md\)$"):
        device.resolve("npu:0")


@pytest.mark.parametrize("place, requested, expected", [
    ("cpu", "auto", "float32"), ("npu:0", "auto", "bfloat16"), ("npu:1", "float16", "float16"),
    ("npu:0", "float32", "float32"), ("mlu:0", "auto", "float32"), ("mlu:0", "bfloat16", "bfloat16")])
def test_dtype_policy(place, requested, expected):
    assert device.resolve_dtype(place, requested) == expected


@pytest.mark.parametrize("place, requested, error", [("cpu", "bfloat16", "only in float32 on CPU"),
                                                     ("npu:0", "int8", "unknown dtype")])
def test_dtype_errors(place, requested, error):
    with pytest.raises(ErnieError, match=error):
        device.resolve_dtype(place, requested)


FLAGS = ("FLAGS_use_stride_kernel", "FLAGS_npu_jit_compile", "FLAGS_npu_storage_format")


@pytest.mark.parametrize("requested, plugin, expected", [
    ("cpu", True, {}), ("gpu:0", True, {}), ("auto", False, {}),
    ("npu:0", False, {"FLAGS_use_stride_kernel": "0", "FLAGS_npu_jit_compile": "0", "FLAGS_npu_storage_format": "0"}),
    ("auto", True, {"FLAGS_use_stride_kernel": "0", "FLAGS_npu_jit_compile": "0", "FLAGS_npu_storage_format": "0"}),
    ("mlu:0", False, {"FLAGS_use_stride_kernel": "0"})])
def test_prepare_environment(monkeypatch, tmp_path, requested, plugin, expected):
    for name in FLAGS:
        monkeypatch.delenv(name, raising=False)
    if plugin:
        (tmp_path / "libpaddle-custom-npu.so").touch()
    monkeypatch.setenv("CUSTOM_DEVICE_ROOT", str(tmp_path))
    device.prepare_environment(requested)
    assert {name: value for name in FLAGS if (value := os.environ.get(name))} == expected


def test_prepare_environment_keeps_the_users_values(monkeypatch):
    monkeypatch.setenv("FLAGS_npu_jit_compile", "1")
    device.prepare_environment("npu")
    assert os.environ["FLAGS_npu_jit_compile"] == "1"


FRESH_TENSOR_FAULTS = """
import resource
from ernie_paddle.device import import_paddle
paddle = import_paddle()
faults = []
for i in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = paddle.full([1024, 6144], float(i))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(sum(faults[20:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("first", ["", "import paddle"], ids=["ours", "the-caller-s"])  # whoever imports paddle
def test_a_freed_tensor_s_memory_is_reused_without_page_faults(first):
    # 24 MB tensors, 30 times: each one written through 6144 fresh 4 KB pages if glibc hands the memory
    # back to the system on free. Kept, the freed block is reused; only while Paddle's threads start up
    # (the first few tensors) can one of their small allocations split the freed block, so the next
    # tensor takes fresh pages: up to 8 such in 10 were seen. The last 10 are counted.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", first + FRESH_TENSOR_FAULTS], env=environment, capture_output=True,
                         text=True, check=True)
    assert int(run.stdout.split()[-1]) < 2 * 6144


def test_synchronize_and_peak_memory_are_safe_on_cpu():
    device.synchronize("cpu")
    assert device.peak_memory("cpu") is None


def npu_ops(name, *args):
    """Plain-Paddle stand-ins for the NPU custom ops, with their calling conventions."""
    if name == "rms_norm_npu":
        x, weight, eps = args
        return [weight * x * paddle.rsqrt((x * x).mean(-1, keepdim=True) + eps), None]
    q, k, v, _, masked, *_ = args  # [B, S, heads, D]; masked: True where attention is cut
    group = q.shape[2] // k.shape[2]
    k, v = (paddle.repeat_interleave(a, group, axis=2).transpose([0, 2, 1, 3]) for a in (k, v))
    scores = paddle.matmul(q.transpose([0, 2, 1, 3]), k, transpose_y=True) * q.shape[-1] ** -0.5
    probs = F.softmax(paddle.where(masked, paddle.full_like(scores, -1e30), scores), axis=-1)
    return [paddle.matmul(probs, v).transpose([0, 2, 1, 3])]


@pytest.fixture
def fake_npu(monkeypatch):
    """NPU custom ops given by `ops(name, *args)`, probed afresh."""
    def install(ops):
        device._probe.cache_clear()
        monkeypatch.setattr(device, "_run_custom_op", ops)
    yield install
    device._probe.cache_clear()


def raise_missing(name, *args):
    raise RuntimeError(f"(NotFound) Can't find {name} in Eager OpMetaInfoMap\nmore detail")


@pytest.mark.parametrize("ops, chosen, logged", [
    (npu_ops, True, "fused op (max relative error"),
    (lambda name, x, *args: [x * 2], False, "plain path (max relative error"),
    (raise_missing, False, "plain path ((NotFound) Can't find"),
])
@pytest.mark.parametrize("op", ["rms_norm_npu", "flash_attention_npu"])
def test_fused_op_probe(fake_npu, caplog, op, ops, chosen, logged):
    fake_npu(ops)
    with caplog.at_level(logging.INFO, logger="ernie_paddle.device"):
        fused = device._probe(op, "npu:0", "float32")
    assert (fused is device.FUSED[op][0]) if chosen else fused is None
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith(f"{op} on npu:0 in float32: {logged}")


def test_fused_ops_only_on_npu_places(fake_npu):
    fake_npu(npu_ops)
    assert device.fused_op("attention", "float32") is None  # the current place is the CPU
    assert device.fused_op("rms_norm", "float32") is None


def test_model_with_fused_ops_matches_the_plain_path(fake_npu, monkeypatch, tiny_pt):
    directory, _ = tiny_pt
    plain = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32")
    fake_npu(npu_ops)
    monkeypatch.setattr(device, "fused_op", lambda name, dtype: device._probe(device.NPU_OPS[name], "npu:0", dtype))
    fused = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32")
    assert fused.model.ernie.norm.fused is device.rms_norm_npu
    assert fused.model.ernie.layers[0].self_attn.fused is device.flash_attention_npu
    prompts = [[5, 7, 9, 11, 3, 100, 150, 17], [31, 4, 77]]
    np.testing.assert_allclose(fused.logits(prompts), plain.logits(prompts), atol=1e-5)
    assert [r.token_ids for r in fused.generate(prompts, max_new_tokens=8)] == \
           [r.token_ids for r in plain.generate(prompts, max_new_tokens=8)]


def test_importing_paddle_leaves_the_callers_logging_alone():
    # Paddle's import gives the root logger a stderr handler at INFO: an HTTP client's every request printed.
    code = ("import logging; from ernie_paddle.device import import_paddle; import_paddle(); "
            "logging.getLogger('httpx').info('HTTP Request: POST'); root = logging.getLogger(); "
            "print(len(root.handlers), logging.getLevelName(root.level))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["0", "WARNING"] and "HTTP Request" not in run.stderr, run.stderr
