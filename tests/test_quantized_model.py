"""Models quantized at load (wint8 / wint4): the demo model's accuracy, both layouts, the MoE experts,
memory, and the one-line errors."""

import json

import numpy as np
import pytest

from conftest import save_tiny_moe_pt, save_tiny_pt
from ernie_paddle import ErniePredictor, cpu_ops
from ernie_paddle.check import DEFAULT_PROMPTS
from ernie_paddle.demo import DEMO_MODEL
from ernie_paddle.errors import ErnieError
from ernie_paddle.model import Packed

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="quantized weights need the CPU kernels")


@pytest.fixture(scope="module")
def demo():
    return {q: ErniePredictor.from_pretrained(DEMO_MODEL, device="cpu", dtype="float32", quantization=q)
            for q in (None, "wint8", "wint4")}


def test_wint8_keeps_the_demo_models_greedy_continuations(demo):
    want = [r.token_ids for r in demo[None].generate(DEFAULT_PROMPTS, max_new_tokens=32)]
    assert [r.token_ids for r in demo["wint8"].generate(DEFAULT_PROMPTS, max_new_tokens=32)] == want


def test_wint4_keeps_the_next_token_of_at_least_7_of_8_prompts(demo):
    agree = 0
    for prompt in DEFAULT_PROMPTS:
        ids = demo[None].tokenizer.encode(prompt)
        agree += demo[None].logits([ids])[0, -1].argmax() == demo["wint4"].logits([ids])[0, -1].argmax()
    assert agree >= 7


def test_matrices_are_packed_and_the_head_keeps_8_bits_where_llama_cpp_does(demo):
    model = demo["wint4"].model
    assert isinstance(model.ernie.layers[0].mlp.up_gate_proj, Packed)
    assert model.ernie.layers[0].mlp.up_gate_proj.format == "wint4"
    assert model.ernie.embed_tokens.format == "wint8"  # the tied embedding is the lm_head; 128 values a row
    assert str(model.ernie.layers[0].input_layernorm.weight.dtype) == "paddle.float32"


def test_check_reports_the_quantization_error(tmp_path, capsys):
    from ernie_paddle.cli import main

    code = main(["check", "--model", str(DEMO_MODEL), "--reference", "cpu", "--device", "cpu",
                 "--quantization", "wint8", "--json", str(tmp_path / "wint8.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "wint8 candidate against a float32 reference: quantized" in out
    report = json.loads((tmp_path / "wint8.json").read_text())
    assert report["precision"] == "wint8" and report["summary"]["greedy"]["prompts_identical"] == 8
    # The same candidate held to the strict float32 thresholds fails: the error is real and measured.
    code = main(["check", "--model", str(DEMO_MODEL), "--reference", "cpu", "--device", "cpu",
                 "--quantization", "wint8", "--max-kl", "1e-5", "--greedy-tokens", "4"])
    assert code == 1


@pytest.mark.parametrize("quantization", ["wint8", "wint4"])
def test_both_layouts_quantize_to_the_same_bits(tmp_path, quantization):
    from converters.convert import pt2paddle

    save_tiny_pt(tmp_path / "pt", tie_word_embeddings=False, hidden_size=80, head_dim=20, intermediate_size=100)
    pt2paddle(tmp_path / "pt", tmp_path / "paddle", progress=False)
    a, b = (ErniePredictor.from_pretrained(tmp_path / d, device="cpu", quantization=quantization) for d in ("pt", "paddle"))
    ids = [[5, 7, 9, 11, 3, 100, 150], [31, 4]]
    assert np.array_equal(a.logits(ids), b.logits(ids))
    assert [r.token_ids for r in a.generate(ids, max_new_tokens=16)] == [r.token_ids for r in b.generate(ids, max_new_tokens=16)]


@pytest.mark.parametrize("head", ["wint8", "wint6"])
@pytest.mark.parametrize("layout", ["pt", "paddle"])
def test_quantizing_a_block_of_rows_at_a_time_gives_the_whole_matrixs_bits(tmp_path, monkeypatch, layout, head):
    """Blocks of 24 rows (16 of the down projection): one crosses the q / k parts of the fused qkv, and
    the vocabulary's 211 rows end in a partial block and 3 rows outside the groups of 8."""
    from converters.convert import pt2paddle
    from ernie_paddle import predictor, quant

    save_tiny_pt(tmp_path / "pt", tie_word_embeddings=False)
    if layout == "paddle":
        pt2paddle(tmp_path / "pt", tmp_path / "paddle", progress=False)
    plain = ErniePredictor.from_pretrained(tmp_path / layout, device="cpu", weight_dtype="float32").model.weights()
    monkeypatch.setattr(predictor, "READ_BLOCK_BYTES", 24 * 64 * 4)
    monkeypatch.setattr(quant, "head_format", lambda format, row_length: head)
    packed = ErniePredictor.from_pretrained(tmp_path / layout, device="cpu", quantization="wint4").model.weights()
    checked = 0
    for name, w in packed.items():
        if isinstance(w, Packed):
            whole = quant.quantize(plain[name].numpy(), w.format)
            assert np.array_equal(w.data.numpy(), whole.data) and np.array_equal(w.scales.numpy(), whole.scales), name
            checked += 1
    assert checked == 2 * 4 + 2  # qkv, o, gate_up, down of two layers; embedding and lm_head
    assert packed["lm_head.weight"].format == head


@pytest.mark.parametrize("quantization", ["wint8", "wint4"])
def test_moe_experts_quantized_give_a_row_the_same_bits_alone_and_in_a_batch(tmp_path, quantization):
    import paddle

    save_tiny_moe_pt(tmp_path, seed=4, moe_num_experts=8, moe_k=2, bias_range=(0, 0.02))
    pred = ErniePredictor.from_pretrained(tmp_path, device="cpu", quantization=quantization)
    moe = pred.model.ernie.layers[1].mlp
    assert isinstance(moe.experts.up_gate_proj, Packed)
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(1, 20, 64)).astype(np.float32))
    with paddle.no_grad():
        together = moe(x)[0].numpy()
        for i in range(20):
            assert np.array_equal(moe(x[:, i:i + 1])[0, 0].numpy(), together[i]), i
    # the grouped kernel equals one quantized matmul per expert
    rows = paddle.to_tensor(np.random.default_rng(1).normal(size=(7, 64)).astype(np.float32))
    offsets = paddle.to_tensor(np.array([0, 2, 2, 5, 5, 5, 6, 7, 7], np.int64))
    stack = moe.experts.up_gate_proj
    got = cpu_ops.grouped_quant_matmul(rows, stack.data, stack.scales, offsets).numpy()
    bounds = offsets.numpy()
    for e in range(8):
        if bounds[e + 1] > bounds[e]:
            one = cpu_ops.quant_matmul(rows[bounds[e]:bounds[e + 1]], stack.data[e], stack.scales[e]).numpy()
            assert np.array_equal(got[bounds[e]:bounds[e + 1]], one), e


def test_a_wint4_model_holds_under_a_third_of_the_float32_bytes(tmp_path):
    from ernie_paddle.bench import weight_bytes

    save_tiny_pt(tmp_path, tie_word_embeddings=False, hidden_size=256, head_dim=64, intermediate_size=512,
                 vocab_size=300)
    full = weight_bytes(ErniePredictor.from_pretrained(tmp_path, device="cpu").model)
    model = ErniePredictor.from_pretrained(tmp_path, device="cpu", quantization="wint4").model
    assert model.lm_head.format == "wint6"  # rows of 256 values: llama.cpp's Q4_0 would keep Q6_K
    assert weight_bytes(model) < full / 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantization="wint3"), "--quantization wint3: choose wint8 or wint4"),
    (dict(quantization="wint4", weight_dtype="float32"), "--weight-dtype float32 with --quantization wint4: give one"),
])
def test_bad_quantization_requests_are_one_line(tmp_path, kwargs, message):
    save_tiny_pt(tmp_path)
    with pytest.raises(ErnieError, match=message):
        ErniePredictor.from_pretrained(tmp_path, device="cpu", **{"dtype": "float32", **kwargs})


def test_quantization_on_a_gpu_points_to_fastdeploy(tmp_path):
    from ernie_paddle.checkpoint import Checkpoint
    from ernie_paddle.predictor import resolve_weight_dtype

    save_tiny_pt(tmp_path)
    with pytest.raises(ErnieError, match="runs on CPU in float32 here .* ernie-paddle deploy fastdeploy --quantization wint4"):
        resolve_weight_dtype("auto", "gpu:0", "bfloat16", Checkpoint(tmp_path), "wint4")
